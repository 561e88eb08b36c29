"""ASCLModel on one device: the training step's contract, queue, EMA, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import ASCLModel, ascl_loss, build_backbone, projection_head

SHAPE = (8, 8, 3)


def _model(memory_size=16, norm="none", seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    backbone = build_backbone("small_cnn", input_shape=SHAPE, norm=norm, bn_splits=2)
    projector = projection_head(backbone.feature_dim, hidden_dims=(32,), output_dim=16)
    kwargs.setdefault("num_neighbors", 3)
    model = ASCLModel(backbone, projector, memory_size=memory_size, seed=seed, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def _views(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.random((n, *SHAPE), dtype=np.float32)


def _keys(model, weak):
    return tf.math.l2_normalize(model.key_encoder(weak, training=True), axis=1).numpy()


@pytest.mark.parametrize("kwargs, name", [
    (dict(memory_size=0), "memory_size"), (dict(num_neighbors=17), "num_neighbors"),
    (dict(t1=0.0), "t1"), (dict(t2=-0.5), "t2"), (dict(mode="byol"), "mode"),
    (dict(momentum=1.5), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
])
def test_invalid_settings_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        _model(**kwargs)


def test_key_encoder_starts_as_a_copy_and_is_not_trainable():
    model = _model()
    for q, k in zip(model.query_encoder.weights, model.key_encoder.weights):
        np.testing.assert_array_equal(q.numpy(), k.numpy())
    assert model.key_encoder.trainable_weights == []
    trainable = {id(w) for w in model.trainable_weights}
    assert trainable == {id(w) for w in model.query_encoder.trainable_weights}
    queue = model.queue.numpy()
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, atol=1e-6)
    assert model.queue_pointer.numpy() == 0


def test_first_step_uses_the_queue_before_its_keys_and_then_enqueues_them():
    model = _model(memory_size=16, shuffle_keys=False)
    strong, weak = _views(4)
    queue0 = model.queue.numpy()
    queries = tf.math.l2_normalize(model.query_encoder(strong, training=True), axis=1)
    keys = _keys(model, weak)
    expected_loss = ascl_loss(queries, keys, queue0, t1=0.1, t2=0.05, num_neighbors=3,
                              mode="ascl").numpy().mean()
    history = model.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected_loss, abs=1e-5)
    queue1 = model.queue.numpy()
    np.testing.assert_allclose(queue1[:4], keys, atol=1e-6)
    np.testing.assert_array_equal(queue1[4:], queue0[4:])
    assert model.queue_pointer.numpy() == 4


def test_key_encoder_is_the_moving_average_of_the_query_encoder():
    model = _model(momentum=0.9, norm="split")
    old_keys = [w.numpy() for w in model.key_encoder.weights]
    strong, weak = _views(8)
    model.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0)
    changed = 0
    for q, k, old in zip(model.query_encoder.weights, model.key_encoder.weights, old_keys):
        if q.trainable:
            np.testing.assert_allclose(k.numpy(), 0.9 * old + 0.1 * q.numpy(), atol=1e-6)
            changed += not np.allclose(k.numpy(), old)
    assert changed > 0
    # BN moving statistics of the key encoder come from its own forward pass on the weak
    # views, not from the EMA: a twin's key encoder, run once on them, lands on the same
    # moving mean (split BN's mean does not depend on the key shuffle's order)
    twin = _model(momentum=0.9, norm="split")
    twin.key_encoder(weak, training=True)
    key_bn = model.key_encoder.get_layer("small_cnn").get_layer("norm1")
    twin_bn = twin.key_encoder.get_layer("small_cnn").get_layer("norm1")
    np.testing.assert_allclose(key_bn.moving_mean.numpy(), twin_bn.moving_mean.numpy(),
                               atol=1e-6)
    assert np.abs(key_bn.moving_mean.numpy()).max() > 1e-4


@pytest.mark.parametrize("memory_size, batch, steps", [(10, 4, 3), (3, 8, 2), (7, 7, 2)])
def test_queue_is_a_ring_for_any_size_and_batch(memory_size, batch, steps):
    model = _model(memory_size=memory_size, num_neighbors=2, shuffle_keys=False, momentum=1.0)
    strong, weak = _views(batch * steps)
    # momentum=1 freezes the key encoder, so every step's keys can be predicted up front
    all_keys = _keys(model, weak)
    expected = model.queue.numpy().copy()
    for index in range(batch * steps):
        expected[index % memory_size] = all_keys[index]
    data = tf.data.Dataset.from_tensor_slices((strong, weak)).batch(batch)
    model.fit(data, verbose=0)
    np.testing.assert_allclose(model.queue.numpy(), expected, atol=1e-5)
    assert model.queue_pointer.numpy() == (batch * steps) % memory_size


def test_key_shuffle_does_not_reorder_the_keys():
    strong, weak = _views(8)
    enqueued = []
    for shuffle in (False, True):
        model = _model(shuffle_keys=shuffle, norm="none", momentum=1.0)
        model.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0)
        enqueued.append(model.queue.numpy()[:8])
    np.testing.assert_allclose(enqueued[0], enqueued[1], atol=1e-5)


def test_fit_accepts_the_documented_element_structures():
    strong, weak = _views(8)
    labels = np.arange(8)
    structures = {
        "pair": (strong, weak),
        "pair_with_labels": (strong, weak, labels),
        "nested_with_labels": ((strong, weak), labels),
        "dict": {"strong_view": strong, "weak_view": weak, "label": labels},
    }
    histories = {name: _model().fit(tf.data.Dataset.from_tensor_slices(data).batch(4),
                                    verbose=0).history for name, data in structures.items()}
    for history in histories.values():
        assert set(history) == {"loss", "confidence", "max_soft_label", "contrastive_accuracy",
                                "projection_spread"}
        # the same views in any structure: the same training, metric for metric
        for key, values in history.items():
            assert values == pytest.approx(histories["pair"][key], rel=1e-6, abs=1e-7), key


def test_on_batch_calls_accept_dict_views():
    strong, weak = _views(8)
    views = {"strong_view": strong, "weak_view": weak}
    by_fit, by_batch = _model(), _model()
    fitted = by_fit.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0)
    logs = by_batch.train_on_batch(views, return_dict=True)
    assert logs["loss"] == pytest.approx(fitted.history["loss"][0], rel=1e-5)
    np.testing.assert_allclose(by_batch.queue.numpy(), by_fit.queue.numpy(), atol=1e-6)
    tested = by_batch.test_on_batch(views, return_dict=True)
    evaluated = by_batch.evaluate(tf.data.Dataset.from_tensors(views), verbose=0,
                                  return_dict=True)
    assert tested["loss"] == pytest.approx(evaluated["loss"], rel=1e-5)


def test_fit_rejects_a_dict_without_the_view_keys():
    strong, weak = _views(4)
    data = tf.data.Dataset.from_tensors({"strong": strong, "weak": weak})
    with pytest.raises(ValueError, match="strong_view.*missing"):
        _model().fit(data, verbose=0)


def test_metrics_are_consistent_with_the_mode():
    strong, weak = _views(8)
    moco = _model(mode="moco").fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0)
    assert moco.history["max_soft_label"][0] == 0.0
    hard = _model(mode="hard", num_neighbors=1).fit(
        tf.data.Dataset.from_tensors((strong, weak)), verbose=0)
    assert hard.history["max_soft_label"][0] == pytest.approx(0.5)
    # identical views through identical encoders: q.k = 1, above any queue entry
    same = _model(momentum=1.0).fit(tf.data.Dataset.from_tensors((strong, strong)), verbose=0)
    assert same.history["contrastive_accuracy"][0] == 1.0


def test_call_and_predict_return_backbone_features():
    model = _model()
    strong, _ = _views(5)
    expected = model.backbone(strong, training=False).numpy()
    np.testing.assert_allclose(model(strong).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(model.predict(strong, verbose=0), expected, atol=1e-6)


def test_evaluate_updates_neither_queue_nor_key_encoder():
    model = _model()
    strong, weak = _views(8)
    queue, keys = model.queue.numpy(), [w.numpy() for w in model.key_encoder.weights]
    result = model.evaluate(tf.data.Dataset.from_tensors((strong, weak)), verbose=0,
                            return_dict=True)
    assert np.isfinite(result["loss"])
    np.testing.assert_array_equal(model.queue.numpy(), queue)
    for w, old in zip(model.key_encoder.weights, keys):
        np.testing.assert_array_equal(w.numpy(), old)


def _trained(tmp_seed=0):
    model = _model(memory_size=12, norm="split", seed=tmp_seed)
    strong, weak = _views(8, seed=tmp_seed)
    model.fit(tf.data.Dataset.from_tensor_slices((strong, weak)).batch(4), verbose=0)
    return model


def _assert_same_state(a, b):
    assert len(a.weights) == len(b.weights)
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=wa.path)
    np.testing.assert_array_equal(a.queue.numpy(), b.queue.numpy())
    assert a.queue_pointer.numpy() == b.queue_pointer.numpy() != 0


def test_keras_file_round_trip_restores_config_and_state(tmp_path):
    model = _trained()
    path = tmp_path / "ascl.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, ASCLModel)
    assert (restored.memory_size, restored.num_neighbors, restored.mode) == (12, 3, "ascl")
    _assert_same_state(model, restored)
    strong, _ = _views(3)
    np.testing.assert_allclose(restored.predict(strong, verbose=0),
                               model.predict(strong, verbose=0), atol=1e-6)


def test_weights_checkpoint_restores_queue_pointer_and_key_encoder(tmp_path):
    model = _trained()
    model.save_weights(tmp_path / "ckpt.weights.h5")
    fresh = _model(memory_size=12, norm="split", seed=5)
    fresh.load_weights(tmp_path / "ckpt.weights.h5")
    _assert_same_state(model, fresh)


def test_jit_compiled_training_matches_graph_mode():
    strong, weak = _views(8)
    data = tf.data.Dataset.from_tensor_slices((strong, weak)).batch(4)
    results = []
    for jit in (False, True):
        model = _model(norm="split", shuffle_keys=False)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), jit_compile=jit)
        history = model.fit(data, epochs=2, verbose=0)
        results.append((history.history["loss"], model.queue.numpy(),
                        model.query_encoder.get_weights()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-4)
    for a, b in zip(results[0][2], results[1][2]):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_mixed_precision_training_keeps_the_queue_in_float32():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = _model(norm="batch")
    strong, weak = _views(8)
    history = model.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0)
    assert model.queue.dtype == "float32" and np.isfinite(history.history["loss"][0])
    np.testing.assert_allclose(np.linalg.norm(model.queue.numpy()[:8], axis=1), 1.0, atol=1e-5)


def test_weight_decay_adds_wd_times_weight_to_the_gradient():
    strong, weak = _views(8)
    data = tf.data.Dataset.from_tensors((strong, weak))
    after = {}
    for decay in (0.0, 0.01):
        model = _model(norm="none", shuffle_keys=False, weight_decay=decay)
        model.compile(optimizer=keras.optimizers.SGD(0.5))
        before = [w.numpy() for w in model.query_encoder.trainable_weights]
        model.fit(data, verbose=0)
        after[decay] = [w.numpy() for w in model.query_encoder.trainable_weights]
    for w0, plain, decayed in zip(before, after[0.0], after[0.01]):
        np.testing.assert_allclose(decayed - plain, -0.5 * 0.01 * w0, atol=1e-6)


def test_label_queue_follows_the_keys_and_purity_matches_numpy():
    from models import ascl_targets

    strong, weak = _views(8)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    model = _model(memory_size=16, momentum=1.0, shuffle_keys=False, label_purity=True)
    # a queue whose first 8 entries carry known classes, the rest unknown (-1)
    queue_labels = np.array([0, 0, 1, 1, 2, 2, 3, 3] + [-1] * 8)
    model.label_queue.assign(queue_labels)
    queue = model.queue.numpy()
    keys = _keys(model, weak)
    targets, _ = ascl_targets(tf.constant(keys), tf.constant(queue), t2=0.05, num_neighbors=3,
                              mode="ascl")
    mass = targets.numpy()[:, 1:]
    known = queue_labels >= 0
    expected = [np.sum(row * (queue_labels == label) * known) / np.sum(row * known)
                for row, label in zip(mass, labels)]
    history = model.fit(tf.data.Dataset.from_tensors((strong, weak, labels)), verbose=0)
    assert history.history["soft_label_purity"][0] == pytest.approx(np.mean(expected), rel=1e-4)
    # the step's labels took the slots its keys took (the pointer was at 0)
    np.testing.assert_array_equal(model.label_queue.numpy()[:8], labels)
    np.testing.assert_array_equal(model.label_queue.numpy()[8:], queue_labels[8:])
    np.testing.assert_allclose(model.queue.numpy()[:8], keys, atol=1e-5)


def test_labels_do_not_change_the_step():
    strong, weak = _views(8)
    labels = np.arange(8) % 3
    without, with_labels = _model(label_purity=True), _model(label_purity=True)
    without.fit(tf.data.Dataset.from_tensors((strong, weak)), verbose=0)
    with_labels.fit(tf.data.Dataset.from_tensors((strong, weak, labels)), verbose=0)
    for a, b in zip(without.weights, with_labels.weights):
        if "label_queue" not in b.path:
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert (without.label_queue.numpy() == -1).all()


def test_objective_is_float32_under_mixed_bfloat16():
    """The encoders compute in bfloat16; targets, confidence, logits and loss do not."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = _model(norm="split", shuffle_keys=False)
    strong, weak = _views(8)
    keys, _ = model._keys_and_gathered(tf.constant(weak))
    assert model.query_encoder(strong).dtype == tf.bfloat16  # the policy is in force
    loss, (logits, targets, confidence, _) = model._objective(
        tf.constant(strong), keys, tf.identity(model.queue.value), training=True)
    assert {t.dtype for t in (keys, loss, logits, targets, confidence)} == {tf.float32}
    np.testing.assert_allclose(targets.numpy().sum(axis=1), 1.0, atol=1e-6)
