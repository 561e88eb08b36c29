"""ASCLModel under MirroredStrategy over two logical CPU devices.

The contract: a step on 2 replicas is the same step as on one device over the
same global batch; every replica's queue and key encoder stay identical.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models import ASCLModel, build_backbone, projection_head

SHAPE = (8, 8, 3)
GLOBAL_BATCH = 8


def _build(norm="none", memory_size=20, momentum=0.9, seed=0):
    backbone = build_backbone("small_cnn", input_shape=SHAPE, norm=norm, bn_splits=2)
    projector = projection_head(backbone.feature_dim, hidden_dims=(32,), output_dim=16)
    model = ASCLModel(backbone, projector, memory_size=memory_size, momentum=momentum,
                      num_neighbors=3, seed=seed)
    model.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    return model


def _views(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE), dtype=np.float32), rng.random((n, *SHAPE), dtype=np.float32)


def _per_replica(variable):
    return [v.numpy() for v in variable.value.values]


def _dataset(strong, weak):
    return tf.data.Dataset.from_tensor_slices((strong, weak)).batch(GLOBAL_BATCH)


def test_one_step_on_two_replicas_equals_one_device(two_replicas):
    keras.utils.set_random_seed(1)
    single = _build()
    initial = single.get_weights()
    with two_replicas.scope():
        mirrored = _build()
    mirrored.set_weights(initial)
    strong, weak = _views(GLOBAL_BATCH)
    key_encoder_before = [w.numpy() for w in single.key_encoder.weights]
    expected_keys = tf.math.l2_normalize(single.key_encoder(weak, training=True), axis=1).numpy()

    one = single.fit(_dataset(strong, weak), verbose=0).history
    two = mirrored.fit(_dataset(strong, weak), verbose=0).history

    # 1. both replicas hold the same queue, with the global batch's keys in order
    first, second = _per_replica(mirrored.queue)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first[:GLOBAL_BATCH], expected_keys, atol=1e-5)
    assert [p for p in _per_replica(mirrored.queue_pointer)] == [GLOBAL_BATCH, GLOBAL_BATCH]

    # 2. same loss, metrics, weights and queue as one device on the global batch
    for name in one:
        assert two[name][0] == pytest.approx(one[name][0], abs=1e-5), name
    for a, b in zip(single.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(single.queue.numpy(), first, atol=1e-5)

    # 3. the key encoder is exactly m * old_key + (1 - m) * new_query, on each replica
    for q, k, old in zip(mirrored.query_encoder.weights, mirrored.key_encoder.weights,
                         key_encoder_before):
        copies = _per_replica(k)
        np.testing.assert_array_equal(copies[0], copies[1])
        if q.trainable:
            np.testing.assert_allclose(copies[0], 0.9 * old + 0.1 * q.numpy(), atol=1e-6)


def test_replica_queues_stay_identical_over_many_steps_and_wraps(two_replicas):
    """Split BN, shuffled keys and a queue smaller than two global batches."""
    with two_replicas.scope():
        model = _build(norm="split", memory_size=12)
    strong, weak = _views(GLOBAL_BATCH * 5, seed=3)
    model.fit(_dataset(strong, weak), epochs=2, verbose=0)
    first, second = _per_replica(model.queue)
    np.testing.assert_array_equal(first, second)
    assert _per_replica(model.queue_pointer) == [(GLOBAL_BATCH * 10) % 12] * 2
    for k in model.key_encoder.trainable_variables + [
            w for w in model.key_encoder.weights if "moving" not in w.path]:
        copies = _per_replica(k)
        np.testing.assert_array_equal(copies[0], copies[1])


def _learnable_views(n, seed):
    """Digits-like problem: 4 prototype patterns; views are noisy, shifted copies."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((4, *SHAPE)).astype(np.float32)
    labels = rng.integers(0, 4, size=n)

    def view(image):
        image = np.roll(image, rng.integers(-1, 2), axis=0)
        return np.clip(image + 0.15 * rng.normal(size=image.shape), 0, 1).astype(np.float32)

    base = prototypes[labels]
    return np.stack([view(x) for x in base]), np.stack([view(x) for x in base])


def test_training_under_two_replicas_learns(two_replicas):
    keras.utils.set_random_seed(0)
    with two_replicas.scope():
        model = _build(norm="batch", memory_size=64, momentum=0.9)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    strong, weak = _learnable_views(256, seed=0)
    data = tf.data.Dataset.from_tensor_slices((strong, weak)).shuffle(256, seed=0).batch(32)
    history = model.fit(data, epochs=8, verbose=0).history
    assert history["loss"][-1] < history["loss"][0] - 0.3
    assert history["contrastive_accuracy"][-1] > history["contrastive_accuracy"][0] + 0.2


def test_synchronised_batch_norm_keeps_replicas_identical(two_replicas):
    """Sync BN normalises with global-batch statistics, so even moving stats agree."""
    with two_replicas.scope():
        model = _build(norm="sync", memory_size=32)
    strong, weak = _views(GLOBAL_BATCH * 2, seed=4)
    history = model.fit(_dataset(strong, weak), verbose=0).history
    assert np.isfinite(history["loss"][0])
    for weight in model.query_encoder.weights + model.key_encoder.weights:
        copies = _per_replica(weight)
        np.testing.assert_allclose(copies[0], copies[1], atol=1e-6, err_msg=weight.path)


def test_label_queues_gather_every_replicas_labels_in_order(two_replicas):
    with two_replicas.scope():
        model = _build(memory_size=12)
        model.label_purity = True
    strong, weak = _views(GLOBAL_BATCH * 2, seed=4)
    labels = np.arange(GLOBAL_BATCH * 2) % 5
    model.fit(tf.data.Dataset.from_tensor_slices((strong, weak, labels)).batch(GLOBAL_BATCH),
              verbose=0)
    first, second = _per_replica(model.label_queue)
    np.testing.assert_array_equal(first, second)
    # 16 labels through a ring of 12, in global batch order: the last 4 overwrote slots 0-3
    np.testing.assert_array_equal(first, np.concatenate([labels[12:], labels[4:12]]))


def test_key_shuffle_runs_across_replicas_like_split_bn_on_one_device(two_replicas):
    """Shuffled BN across replicas: plain BN on 2 replicas, each normalising its slice of the
    globally permuted weak batch, equals split BN (2 splits) on one device that draws the same
    permutation of the same global batch.  Without the cross-replica shuffle each replica
    would normalise its own, unshuffled-in-effect half, and the keys would differ."""
    keras.utils.set_random_seed(3)
    backbone = build_backbone("small_cnn", input_shape=SHAPE, norm="split", bn_splits=2)
    projector = projection_head(backbone.feature_dim, hidden_dims=(32,), output_dim=16)
    single = ASCLModel(backbone, projector, memory_size=20, momentum=0.9, num_neighbors=3,
                       seed=0)
    single.compile(optimizer=keras.optimizers.SGD(0.5, momentum=0.9))
    with two_replicas.scope():
        mirrored = _build(norm="batch", memory_size=20)
    mirrored.set_weights(single.get_weights())
    strong, weak = _views(GLOBAL_BATCH * 3, seed=5)
    one = single.fit(_dataset(strong, weak), verbose=0).history
    two = mirrored.fit(_dataset(strong, weak), verbose=0).history
    for name in one:
        assert two[name][0] == pytest.approx(one[name][0], abs=1e-5), name
    np.testing.assert_allclose(_per_replica(mirrored.queue)[0], single.queue.numpy(), atol=1e-5)
    for a, b in zip(single.weights, mirrored.weights):
        if "moving" not in a.path:  # split BN averages its splits' statistics
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)


def test_unequal_replica_slices_fail_loudly(two_replicas):
    """A global batch of 7 splits 4 + 3: the gathered rows would not line up."""
    from models import BYOLModel

    with two_replicas.scope():
        moco = _build(memory_size=20)
        backbone = build_backbone("small_cnn", input_shape=SHAPE, norm="none")
        byol = BYOLModel(backbone, projection_head(backbone.feature_dim, output_dim=16),
                         seed=0)
        byol.compile(optimizer=keras.optimizers.SGD(0.1))
    strong, weak = _views(7)
    for model in (moco, byol):
        with pytest.raises(Exception, match="same number of examples"):
            model.fit(tf.data.Dataset.from_tensor_slices((strong, weak)).batch(7), verbose=0)
