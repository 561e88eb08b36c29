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
    other_seed = _first(data.pretrain_dataset(digits16, batch_size=16, seed=6))
    assert not np.allclose(first_a["strong_view"], other_seed["strong_view"])
    # Keras keeps one iterator over the repeated data: epoch 2 comes from the same one
    steps = digits16["splits"]["train"]["num_examples"] // 16
    iterator = iter(data.pretrain_dataset(digits16, batch_size=16, seed=5))
    epoch_one = [next(iterator) for _ in range(steps)]
    epoch_two_first = next(iterator)
    np.testing.assert_array_equal(epoch_one[0]["strong_view"].numpy(), first_a["strong_view"])
    assert not np.allclose(epoch_two_first["strong_view"].numpy(), first_a["strong_view"])
    assert not np.array_equal(epoch_two_first["label"].numpy(), first_a["label"])


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


def test_replicas_get_per_replica_batches(digits16, two_replicas):
    dataset = two_replicas.distribute_datasets_from_function(
        lambda context: data.pretrain_dataset(digits16, batch_size=32, seed=0,
                                              input_context=context))
    batch = next(iter(dataset))
    first, second = (v.numpy() for v in batch["strong_view"].values)
    assert first.shape == second.shape == (16, 16, 16, 3)


def test_each_input_pipeline_draws_its_own_augmentation_seeds():
    import tensorflow as tf

    def seeds(pipeline_id, count=20):
        context = tf.distribute.InputContext(num_input_pipelines=2,
                                             input_pipeline_id=pipeline_id)
        return {tuple(np.ravel(s.numpy())) for s in data._batch_seeds(0, context).take(count)}

    assert seeds(0) == seeds(0)  # reproducible
    assert len(seeds(0)) == 20 and not seeds(0) & seeds(1)  # no batch seed shared


def test_eval_dataset_is_the_centre_view_in_order(digits16):
    images, labels = next(iter(data.eval_dataset(digits16, "test", batch_size=8)))
    raw_images, raw_labels = next(iter(read_split(digits16, "test").batch(8)))
    stats = digits16["train_statistics"]
    expected = (raw_images.numpy() / 255.0 - np.array(stats["mean"]) / 255) / (
        np.array(stats["std"]) / 255)
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(labels.numpy(), raw_labels.numpy())


# -- data order: class-mixed batches whatever the storage order ---------------------------------

def _largest_share(labels):
    return np.bincount(labels, minlength=10).max() / len(labels)


def _iid_mean_largest_share(labels, batch, trials=2000, seed=0):
    """Mean largest-class share of a batch drawn by a full random permutation."""
    rng = np.random.default_rng(seed)
    return np.mean([_largest_share(rng.permutation(labels)[:batch]) for _ in range(trials)])


def _epoch_labels(manifest, epochs, batch_size, **kwargs):
    steps = manifest["splits"]["train"]["num_examples"] // batch_size
    iterator = iter(data.pretrain_dataset(manifest, batch_size=batch_size, seed=0, **kwargs))
    return [np.concatenate([next(iterator)["label"].numpy() for _ in range(steps)])
            for _ in range(epochs)]


def test_prepared_shards_are_class_mixed_in_storage_order(class_foldered):
    labels = np.array([int(label) for _, label in
                       read_split(class_foldered, "train").as_numpy_iterator()])
    windows = labels[: len(labels) // 60 * 60].reshape(-1, 60)
    assert max(_largest_share(window) for window in windows) < 0.4  # class-sorted: 1.0


def test_training_batches_are_class_mixed_even_from_class_sorted_shards(class_sorted):
    # a buffer far smaller than the split, as a user might configure: the cached split is
    # still shuffled whole, so batches look like i.i.d. draws
    epochs = _epoch_labels(class_sorted, 2, 30, shuffle_buffer=20)
    iid = _iid_mean_largest_share(epochs[0], 30)
    for labels in epochs:
        batches = labels.reshape(-1, 30)
        assert abs(np.mean([_largest_share(b) for b in batches]) - iid) < 0.05
        assert max(_largest_share(w) for w in labels.reshape(-1, 120)) < 0.25


def test_every_epoch_is_a_new_permutation_of_the_whole_split(class_foldered):
    first, second = _epoch_labels(class_foldered, 2, 30)
    for labels in (first, second):  # 600 images, 20 full batches: each image once per epoch
        np.testing.assert_array_equal(np.bincount(labels), [60] * 10)
    assert not np.array_equal(first, second)


def test_file_order_is_reshuffled_every_pass_and_shared_by_equal_seeds(class_foldered):
    def passes(seed):
        stream = read_split(class_foldered, "train", with_ids=True, shuffle_files_seed=seed)
        ids = [example_id for _, _, example_id in stream.repeat(8).as_numpy_iterator()]
        return [tuple(ids[i:i + 600]) for i in range(0, len(ids), 600)]

    first = passes(3)
    assert len({p[0] for p in first}) == 2  # both shards lead some pass
    assert all(sorted(p) == sorted(first[0]) for p in first)
    assert passes(3) == first


def _image_bytes(dataset):
    return [image.tobytes() for image, _ in dataset.as_numpy_iterator()]


def test_limit_is_a_fixed_class_mixed_sample(class_sorted):
    selection = data.splits.Selection("train", limit=100)
    images, count, _ = data._images(class_sorted, selection)
    labels = np.array([int(label) for _, label in images.as_numpy_iterator()])
    assert count == len(labels) == 100
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 3 and counts.max() <= 20  # the first 100 would be 2 classes
    again, _, _ = data._images(class_sorted, selection)
    assert _image_bytes(again) == _image_bytes(images)


def test_validation_holdout_and_rest_partition_the_split(class_foldered):
    holdout = data.splits.holdout_count(0.1, 600)
    parts = {part: _image_bytes(data._images(class_foldered, data.splits.Selection(
        "train", holdout=holdout, part=part))[0]) for part in ("holdout", "rest")}
    assert len(parts["holdout"]) == 60 and len(parts["rest"]) == 540
    assert not set(parts["holdout"]) & set(parts["rest"])
    assert set(parts["holdout"]) | set(parts["rest"]) == set(
        _image_bytes(data._images(class_foldered, "train")[0]))
    labels = [int(label) for _, label in data._images(class_foldered, data.splits.Selection(
        "train", holdout=holdout, part="holdout"))[0].as_numpy_iterator()]
    assert _largest_share(np.array(labels)) <= 0.25


def _contexts(count):
    import tensorflow as tf

    return [tf.distribute.InputContext(num_input_pipelines=count, input_pipeline_id=i,
                                       num_replicas_in_sync=count) for i in range(count)]


def test_input_pipelines_shard_by_file_when_there_are_enough_shards(class_sorted, monkeypatch):
    from beam_jobs.dataset_format import split_files
    from pipeline.prepared_dataset import read_split

    # the fixture's 2 hash-filled shards of ~300 may differ by more than the 10% that
    # decides the policy (tested below); here the reading itself is under test
    monkeypatch.setattr(data, "FILE_SHARE_TOLERANCE", 1.0)
    files = split_files(class_sorted, "train")
    assert len(files) == 2
    # 2 pipelines, 2 shards: pipeline i reads shard i and nothing else
    for context, path in zip(_contexts(2), files):
        images, count, _ = data._images(class_sorted, "train", input_context=context,
                                        shuffle_files_seed=0)
        own = _image_bytes(read_split(class_sorted, "train", files=[path]))
        assert sorted(_image_bytes(images)) == sorted(own) and count == len(own)
    # with a hash-chosen part the per-pipeline counts are exact (tf.data asserts them)
    rest = data.splits.Selection("train", holdout=100, part="rest")
    parts = [data._images(class_sorted, rest, input_context=c, shuffle_files_seed=0)
             for c in _contexts(2)]
    seen = [_image_bytes(images) for images, _, _ in parts]
    assert [len(s) for s in seen] == [count for _, count, _ in parts]
    assert sum(len(s) for s in seen) == 500 and not set(seen[0]) & set(seen[1])


def test_input_pipelines_shard_by_element_with_fewer_shards_and_are_class_mixed(class_sorted):
    # 3 pipelines, 2 shards: every pipeline reads both files and keeps every third example
    shards = [set(_image_bytes(data._images(class_sorted, "train", input_context=c,
                                            shuffle_files_seed=0)[0])) for c in _contexts(3)]
    assert [len(s) for s in shards] == [200, 200, 200]
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    for context in _contexts(3) + _contexts(2):
        iterator = iter(data.pretrain_dataset(class_sorted, batch_size=60, seed=0,
                                              input_context=context, shuffle_buffer=10))
        labels = np.concatenate([next(iterator)["label"].numpy() for _ in range(20)])
        size = 20 if context.num_input_pipelines == 3 else 30  # per-replica batch
        iid = _iid_mean_largest_share(labels, size)
        assert abs(np.mean([_largest_share(b) for b in labels.reshape(-1, size)]) - iid) < 0.05


def test_probe_training_views_are_random_resized_crops_from_008(digits16, monkeypatch):
    scales = []
    weak_view = data.augment.weak_view

    def recording(*args, **kwargs):
        scales.append(kwargs["scale"])
        return weak_view(*args, **kwargs)

    monkeypatch.setattr(data.augment, "weak_view", recording)
    next(iter(data.probe_train_dataset(digits16, "train", batch_size=16)))
    assert scales == [(0.08, 1.0)]


def test_training_reader_reshuffles_files_from_the_training_seed(class_foldered, monkeypatch):
    calls = []
    read_split = data.read_split
    monkeypatch.setattr(data, "read_split",
                        lambda *a, **kw: calls.append(kw) or read_split(*a, **kw))
    data.pretrain_dataset(class_foldered, batch_size=30, seed=7)
    assert calls and calls[0]["shuffle_files_seed"] == 7


def test_file_shares_are_used_only_when_they_are_even():
    shards = [(f"s{i}", 100) for i in range(16)]
    assert [len(share) for share in data._file_shares(shards, 4)] == [4, 4, 4, 4]
    assert data._file_shares(shards, 9) is None  # 2 shards for seven workers, 1 for two
    assert data._file_shares(shards, 17) is None  # fewer shards than pipelines
    assert data._file_shares(shards, 1) is None
    assert data._file_shares(shards, 16) is not None
    uneven = [(f"s{i}", 100 if i else 150) for i in range(4)]
    assert data._file_shares(uneven, 2) is None  # 250 against 200: more than 10% apart


def test_a_resumed_pipeline_skips_one_batch_per_replica_it_feeds(digits16):
    import tensorflow as tf

    # one pipeline feeding two replicas (MirroredStrategy on a 2-device machine): every
    # training step takes two of its batches
    context = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                         num_replicas_in_sync=2)
    uninterrupted = iter(data.pretrain_dataset(digits16, batch_size=32, seed=0,
                                               input_context=context))
    batches = [next(uninterrupted) for _ in range(8)]
    resumed = next(iter(data.pretrain_dataset(digits16, batch_size=32, seed=0,
                                              input_context=context, skip_steps=3)))
    np.testing.assert_array_equal(resumed["label"], batches[6]["label"])
    np.testing.assert_array_equal(resumed["strong_view"], batches[6]["strong_view"])
