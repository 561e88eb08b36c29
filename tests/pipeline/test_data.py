"""tf.data input from a prepared dataset: views, normalisation, seeds, replicas."""

import numpy as np

from pipeline import data
from pipeline.prepared_dataset import read_split


def _first(dataset):
    return {k: v.numpy() for k, v in next(iter(dataset)).items()}


def test_pretrain_batches_have_two_normalised_views(digits16):
    batch = _first(data.pretrain_dataset(digits16, batch_size=32, seed=0))
    assert batch["strong_view"].shape == batch["weak_view"].shape == (32, 16, 16, 3)
    assert batch["strong_view"].dtype == np.float32 and batch["label"].shape == (32,)
    assert not np.allclose(batch["strong_view"], batch["weak_view"])
    # normalised with the manifest's statistics: roughly zero mean, unit spread
    assert abs(batch["weak_view"].mean()) < 0.5 and 0.5 < batch["weak_view"].std() < 1.5


def test_batches_are_full_and_repeat_for_keras_steps_per_epoch(digits16):
    count = digits16["splits"]["train"]["num_examples"]
    batches = list(data.pretrain_dataset(digits16, batch_size=100, seed=0).take(3 * (count // 100)))
    assert len(batches) == 3 * (count // 100)
    assert all(b["strong_view"].shape[0] == 100 for b in batches)


def test_same_seed_same_views_and_epochs_differ(digits16):
    a = data.pretrain_dataset(digits16, batch_size=16, seed=5)
    b = data.pretrain_dataset(digits16, batch_size=16, seed=5)
    first_a, first_b = _first(a), _first(b)
    np.testing.assert_array_equal(first_a["strong_view"], first_b["strong_view"])
    second_epoch = _first(a)
    assert not np.allclose(first_a["strong_view"], second_epoch["strong_view"])
    other_seed = _first(data.pretrain_dataset(digits16, batch_size=16, seed=6))
    assert not np.allclose(first_a["strong_view"], other_seed["strong_view"])


def test_key_view_switch_selects_the_strong_augmentation(digits16, monkeypatch):
    calls = []
    strong_view = data.augment.strong_view

    def recording_strong_view(*args, **kwargs):
        calls.append(kwargs)
        return strong_view(*args, **kwargs)

    monkeypatch.setattr(data.augment, "strong_view", recording_strong_view)
    _first(data.pretrain_dataset(digits16, batch_size=16, seed=1))
    assert len(calls) == 1  # traced once: the query's view only
    _first(data.pretrain_dataset(digits16, batch_size=16, seed=1, strong_key=True))
    assert len(calls) == 3  # query and key


def test_replicas_get_per_replica_batches_and_different_randomness(digits16, two_replicas):
    dataset = two_replicas.distribute_datasets_from_function(
        lambda context: data.pretrain_dataset(digits16, batch_size=32, seed=0,
                                              input_context=context))
    batch = next(iter(dataset))
    first, second = (v.numpy() for v in batch["strong_view"].values)
    assert first.shape == second.shape == (16, 16, 16, 3)
    assert not np.allclose(first, second)


def test_eval_dataset_is_the_centre_view_in_order(digits16):
    images, labels = next(iter(data.eval_dataset(digits16, "test", batch_size=8)))
    raw_images, raw_labels = next(iter(read_split(digits16, "test").batch(8)))
    stats = digits16["train_statistics"]
    expected = (raw_images.numpy() / 255.0 - np.array(stats["mean"]) / 255) / (
        np.array(stats["std"]) / 255)
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(labels.numpy(), raw_labels.numpy())
