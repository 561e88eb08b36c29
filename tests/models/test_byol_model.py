"""BYOLModel: the BYOL form's step, EMA target, saving, and exactness across replicas."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import BYOLModel, build_backbone, byol_ascl_loss, prediction_head, projection_head

SHAPE = (8, 8, 3)


def _model(norm="none", predictor_norm="batch", seed=0, compile=True, **kwargs):
    keras.utils.set_random_seed(seed)
    backbone = build_backbone("small_cnn", input_shape=SHAPE, norm=norm, bn_splits=2)
    projector = projection_head(backbone.feature_dim, hidden_dims=(32,), output_dim=16)
    predictor = prediction_head(16, hidden_dims=(24,), norm=predictor_norm)
    kwargs.setdefault("num_neighbors", 3)
    model = BYOLModel(backbone, projector, predictor, seed=seed, **kwargs)
    if compile:
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def _views(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.random((n, *SHAPE), dtype=np.float32)


@pytest.mark.parametrize("kwargs, name", [
    (dict(mode="moco"), "mode"), (dict(num_neighbors=0), "num_neighbors"),
    (dict(t2=0.0), "t2"), (dict(momentum=1.5), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_invalid_settings_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        _model(**kwargs)


def test_predictor_must_map_the_embedding_to_itself():
    backbone = build_backbone("small_cnn", input_shape=SHAPE)
    projector = projection_head(backbone.feature_dim, hidden_dims=(32,), output_dim=16)
    with pytest.raises(ValueError, match="`predictor` must map the projector's 16-d"):
        BYOLModel(backbone, projector, projection_head(16, hidden_dims=(8,), output_dim=12))


def test_default_predictor_is_the_reference_one():
    backbone = build_backbone("small_cnn", input_shape=SHAPE)
    model = BYOLModel(backbone, projection_head(backbone.feature_dim))
    kinds = [type(layer).__name__ for layer in model.predictor.layers[1:]]
    assert kinds == ["Dense", "BatchNormalization", "ReLU", "Dense"]
    assert model.predictor.layers[1].units == 512 and model.predictor.output_shape == (None, 128)


def test_trainable_weights_are_the_online_encoder_and_predictor():
    model = _model()
    assert model.key_encoder.trainable_weights == []
    expected = model.query_encoder.trainable_weights + model.predictor.trainable_weights
    assert {id(w) for w in model.trainable_weights} == {id(w) for w in expected}
    for q, k in zip(model.query_encoder.weights, model.key_encoder.weights):
        np.testing.assert_array_equal(q.numpy(), k.numpy())


@pytest.mark.parametrize("mode", ["ascl", "byol"])
def test_first_step_loss_and_moving_average_target(mode):
    model = _model(momentum=0.9, mode=mode)
    strong, weak = _views(6)
    twin = _model(momentum=0.9, mode=mode, compile=False)
    twin.set_weights(model.get_weights())
    keys = twin.key_encoder(weak, training=True)
    predictions = twin.predictor(twin.query_encoder(strong, training=True), training=True)
    expected = byol_ascl_loss(predictions, keys, t2=0.05, num_neighbors=3, mode=mode).numpy()
    target_before = [w.numpy() for w in model.key_encoder.weights]
    predictor_before = [w.numpy() for w in model.predictor.trainable_weights]

    history = model.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0).history

    assert history["loss"][0] == pytest.approx(expected.mean(), abs=1e-5)
    for q, k, old in zip(model.query_encoder.weights, model.key_encoder.weights, target_before):
        if q.trainable:
            np.testing.assert_allclose(k.numpy(), 0.9 * old + 0.1 * q.numpy(), atol=1e-6)
    assert any(np.abs(w.numpy() - old).max() > 0
               for w, old in zip(model.predictor.trainable_weights, predictor_before))
    if mode == "byol":
        assert history["max_soft_label"][0] == 0.0


def test_soft_labels_credit_neighbours_and_purity_matches_numpy():
    from models import byol_ascl_targets

    # two pairs of near-identical weak views: confident keys with a clear neighbour
    strong, weak = _views(8)
    weak[1], weak[3] = weak[0] + 0.01, weak[2] + 0.01
    labels = np.array([0, 0, 1, 2, 1, 2, 0, 1])
    model = _model(label_purity=True)
    targets, _ = byol_ascl_targets(model.key_encoder(weak, training=True), num_neighbors=3)
    mass = targets.numpy() * (1 - np.eye(8))
    expected = np.mean([np.sum(row * (labels == label)) / row.sum()
                        for row, label in zip(mass, labels)])
    history = model.fit(tf.data.Dataset.from_tensors((strong, weak, labels)), verbose=0).history
    assert history["soft_label_purity"][0] == pytest.approx(expected, rel=1e-4)
    assert history["max_soft_label"][0] > 0.0


def test_weight_decay_reaches_the_predictor_through_the_loss():
    strong, weak = _views(8)
    data = tf.data.Dataset.from_tensors((strong, weak))
    after = {}
    for decay in (0.0, 0.01):
        model = _model(weight_decay=decay, predictor_norm="none")
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        before = [w.numpy() for w in model.trainable_weights]
        model.fit(data, verbose=0)
        after[decay] = [w.numpy() for w in model.trainable_weights]
    assert len(before) > len(_model().query_encoder.trainable_weights)
    for w0, plain, decayed in zip(before, after[0.0], after[0.01]):
        np.testing.assert_allclose(decayed - plain, -0.5 * 0.01 * w0, atol=1e-6)


def test_keras_file_round_trip(tmp_path):
    model = _model(norm="split", mode="ascl", t2=0.07, num_neighbors=2)
    strong, weak = _views(8)
    model.fit(tf.data.Dataset.from_tensors((strong, weak)), epochs=2, verbose=0)
    model.save(tmp_path / "byol.keras")
    restored = keras.models.load_model(tmp_path / "byol.keras")
    assert isinstance(restored, BYOLModel)
    assert (restored.mode, restored.t2, restored.num_neighbors) == ("ascl", 0.07, 2)
    for a, b in zip(model.weights, restored.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    np.testing.assert_allclose(restored.predict(strong, verbose=0),
                               model.predict(strong, verbose=0), atol=1e-6)


def test_jit_compiled_training_matches_graph_mode():
    strong, weak = _views(8)
    data = tf.data.Dataset.from_tensor_slices((strong, weak)).batch(4)
    results = []
    for jit in (False, True):
        model = _model(norm="split")
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=jit)
        history = model.fit(data, epochs=2, verbose=0).history
        results.append((history["loss"], model.get_weights()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_evaluate_leaves_the_weights_alone():
    model = _model()
    strong, weak = _views(8)
    before = [w.numpy() for w in model.weights]
    result = model.evaluate(tf.data.Dataset.from_tensors((strong, weak)), verbose=0,
                            return_dict=True)
    assert np.isfinite(result["loss"])
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


# ------------------------------------------------------------------- two replicas
def _per_replica(variable):
    return [v.numpy() for v in variable.value.values]


@pytest.mark.parametrize("mode, options", [
    ("ascl", {}), ("byol", {}),
    ("ascl", dict(symmetric=True, momentum_schedule="cosine", momentum_steps=4)),
])
def test_a_step_on_two_replicas_equals_one_device_on_the_global_batch(two_replicas, mode,
                                                                      options):
    """Synchronised BN everywhere, so that statistics are the global batch's on both."""
    single = _model(norm="sync", predictor_norm="sync", mode=mode, momentum=0.9,
                    label_purity=True, **options)
    with two_replicas.scope():
        mirrored = _model(norm="sync", predictor_norm="sync", mode=mode, momentum=0.9,
                          label_purity=True, **options)
    mirrored.set_weights(single.get_weights())
    strong, weak = _views(16, seed=4)
    weak[9] = weak[2] + 0.01  # a neighbour across the replicas' halves
    labels = np.arange(16) % 3
    data = tf.data.Dataset.from_tensor_slices((strong, weak, labels)).batch(8)

    one = single.fit(data, epochs=2, verbose=0).history
    two = mirrored.fit(data, epochs=2, verbose=0).history

    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-5, err_msg=name)
    for a, b in zip(single.weights, mirrored.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)
        copies = _per_replica(b)
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=b.path)
    if mode == "ascl":
        assert one["max_soft_label"][0] > 0.05  # the cross-replica neighbour was credited


def _reference_fixture_model(mode, **kwargs):
    """The model of tests/models/data/make_byol_reference.py."""
    keras.utils.set_random_seed(0)
    backbone = build_backbone("small_cnn", input_shape=(8, 8, 3), norm="batch",
                              widths=(8, 16, 16))
    projector = projection_head(backbone.feature_dim, hidden_dims=(32,), output_dim=16)
    predictor = prediction_head(16, hidden_dims=(24,))
    model = BYOLModel(backbone, projector, predictor, seed=0, num_neighbors=3, mode=mode,
                      weight_decay=5e-4, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


@pytest.mark.parametrize("mode", ["ascl", "byol"])
def test_the_reference_recipe_is_the_step_recorded_before_the_options_existed(mode):
    """symmetric=False with a constant momentum gives, after two steps, the weights the
    code gave before those options were added (recorded in the fixture)."""
    recorded = np.load(os.path.join(os.path.dirname(__file__), "data",
                                    "byol_reference_two_steps.npz"))
    model = _reference_fixture_model(mode, symmetric=False, momentum_schedule="constant")
    views = {"strong_view": recorded["strong"], "weak_view": recorded["weak"]}
    for _ in range(2):
        model.train_on_batch(views)
    weights = model.get_weights()
    assert len(weights) == len([k for k in recorded.files if k.startswith(f"{mode}/")])
    for index, weight in enumerate(weights):
        # atol as recorded on one CPU; rtol for another CPU's kernels on larger weights
        np.testing.assert_allclose(weight, recorded[f"{mode}/{index}"], atol=1e-6, rtol=1e-5)


def _numpy_soft_labels(keys, t2, num_neighbors):
    keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    n = len(keys)
    logits = keys @ keys.T / t2
    np.fill_diagonal(logits, -np.inf)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    confidence = 1 - entropy / np.log(n - 1)
    labels = np.eye(n) + np.minimum(1, num_neighbors * confidence[:, None] * p)
    return labels / labels.sum(axis=1, keepdims=True)


def _numpy_regression(predictions, keys, labels):
    predictions = predictions / np.linalg.norm(predictions, axis=1, keepdims=True)
    keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    return 2 - 2 * np.sum(labels * (predictions @ keys.T), axis=1)


@pytest.mark.parametrize("mode", ["ascl", "byol"])
def test_the_symmetric_loss_is_the_sum_of_its_two_directions(mode):
    """Strong predicts the weak view's keys, weak predicts the strong view's keys, both
    weighted by the soft labels of the weak-view keys; summed per example."""
    model = _model(mode=mode, symmetric=True)
    strong, weak = _views(6)
    strong[1] = strong[0] + 0.01
    weak[1] = weak[0] + 0.01  # a clear neighbour, so the soft labels are not the identity
    twin = _model(mode=mode, symmetric=True, compile=False)
    twin.set_weights(model.get_weights())

    def predict(views):
        return twin.predictor(twin.query_encoder(views, training=True), training=True).numpy()

    weak_keys = twin.key_encoder(weak, training=True).numpy()
    strong_keys = twin.key_encoder(strong, training=True).numpy()
    labels = (_numpy_soft_labels(weak_keys, 0.05, 3) if mode == "ascl" else np.eye(6))
    if mode == "ascl":
        assert labels[0, 1] > 0.05
    forward = _numpy_regression(predict(strong), weak_keys, labels)
    backward = _numpy_regression(predict(weak), strong_keys, labels)

    history = model.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0).history
    assert history["loss"][0] == pytest.approx(np.mean(forward + backward), abs=1e-5)
    one_way = _model(mode=mode, symmetric=False)
    one_way.set_weights(twin.get_weights())
    history = one_way.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0).history
    assert history["loss"][0] == pytest.approx(np.mean(forward), abs=1e-5)


def test_the_cosine_momentum_schedule_anneals_the_target_to_one():
    from models.momentum_encoder import ema_momentum

    values = [float(ema_momentum(0.99, step, 100, "cosine")) for step in (0, 50, 100, 150)]
    assert values == pytest.approx([0.99, 0.995, 1.0, 1.0], abs=1e-7)
    assert float(ema_momentum(0.99, 70, 100, "constant")) == pytest.approx(0.99)

    # the first update uses the base momentum; the k-th (from 0) of K uses ema_momentum(k)
    strong, weak = _views(6)
    data = tf.data.Dataset.from_tensors((strong, weak))
    model = _model(momentum=0.9, momentum_schedule="cosine", momentum_steps=2)
    for expected_m in (0.9, 0.95):  # k = 0: base; k = 1 of 2: 1 - 0.1 * (cos(pi/2) + 1) / 2
        before = [w.numpy() for w in model.key_encoder.weights]
        model.fit(data, verbose=0)
        for q, k, old in zip(model.query_encoder.weights, model.key_encoder.weights, before):
            if q.trainable:
                np.testing.assert_allclose(k.numpy(), expected_m * old
                                           + (1 - expected_m) * q.numpy(), atol=1e-6)
    model.fit(data, verbose=0)  # k = 2 of 2: m = 1, the target no longer moves
    before = [w.numpy() for w in model.key_encoder.weights]
    model.fit(data, verbose=0)
    for weight, old in zip(model.key_encoder.weights, before):
        np.testing.assert_array_equal(weight.numpy(), old)
    with pytest.raises(ValueError, match="momentum_steps"):
        _model(momentum_schedule="cosine").fit(data, verbose=0)
    with pytest.raises(ValueError, match="momentum_schedule="):
        _model(momentum_schedule="linear")
