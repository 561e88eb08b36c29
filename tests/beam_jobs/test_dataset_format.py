"""The prepared-dataset format: names, records, the manifest's checks, the resize policy."""

import fnmatch
import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

from beam_jobs.atomic_json import write_json
from beam_jobs.dataset_format import (
    DEAD_LETTERS_NAME,
    FEATURES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_FILE_PATTERN,
    DatasetError,
    decode_example,
    encode_example,
    is_dataset_file,
    load_manifest,
    parse_example,
    shard_file_glob,
    shard_file_name,
    split_files,
    split_shards,
    square_crop_and_resize,
)
from beam_jobs.images import encode_png

RECORD = dict(png=b"\x89PNG-bytes", shape=(2, 3, 3), label=1, class_name="cät",
              example_id="train/cät/0.png", source_path="/x/cät/0.png", split="train")


def _pixels(seed, size=4):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _record(index, split, class_names=("cat", "dog")):
    pixels = _pixels(index)
    class_name = class_names[index % len(class_names)]
    return pixels, encode_example(
        png=encode_png(pixels), shape=pixels.shape, label=index % len(class_names),
        class_name=class_name, example_id=f"{split}/{class_name}/{index}.png",
        source_path=f"/images/{split}/{class_name}/{index}.png", split=split)


def _write_dataset(directory, counts):
    """A dataset of ``{split: [examples per shard]}`` written here as the job writes one."""
    splits = {}
    for split, per_shard in counts.items():
        shards = []
        for index, count in enumerate(per_shard):
            name = shard_file_name(split, index, len(per_shard))
            path = f"{directory}/{name}"
            with tf.io.TFRecordWriter(path) as writer:
                for number in range(count):
                    writer.write(_record(10 * index + number, split)[1])
            with tf.io.gfile.GFile(path, "rb") as handle:
                data = handle.read()
            shards.append({"file": name, "num_examples": count, "size_bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"num_examples": sum(per_shard), "shards": shards}
    manifest = {"format_version": FORMAT_VERSION, "image_shape": [4, 4, 3],
                "class_names": ["cat", "dog"], "splits": splits, "train_statistics": None}
    write_json(f"{directory}/{MANIFEST_NAME}", manifest, indent=2)
    return manifest


def test_encoded_bytes_are_deterministic_and_unchanged():
    # the digest of the bytes that the preparation job has always written for this record
    assert hashlib.sha256(encode_example(**RECORD)).hexdigest() == (
        "548435641069743e735d18fd6299b904e4430026c177ddae19baf1c87cdd5d51")
    assert encode_example(**RECORD) == encode_example(**RECORD)


def test_a_record_reads_back_as_written():
    serialized = encode_example(**RECORD)
    expected = {"image/encoded": RECORD["png"], "image/format": b"png", "image/height": 2,
                "image/width": 3, "image/channels": 3, "label": 1,
                "class_name": "cät".encode(), "id": "train/cät/0.png".encode(),
                "source_path": "/x/cät/0.png".encode(), "split": b"train"}
    assert parse_example(serialized) == expected
    parsed = tf.io.parse_single_example(serialized, FEATURES)
    assert {name: value.numpy() for name, value in parsed.items()} == expected


def test_decode_example_gives_the_pixels_label_and_id():
    pixels, serialized = _record(3, "test")
    image, label = decode_example(serialized, [4, 4, 3])
    np.testing.assert_array_equal(image.numpy(), pixels)
    assert image.dtype == tf.uint8 and int(label) == 1
    image, label, example_id = decode_example(serialized, [4, 4, 3], with_id=True)
    np.testing.assert_array_equal(image.numpy(), pixels)
    assert example_id.numpy() == b"test/dog/3.png"
    with pytest.raises(tf.errors.InvalidArgumentError, match="not compatible with expected "
                                                          r"shape \[5,5,3\]"):
        decode_example(serialized, [5, 5, 3])


def test_parse_example_defaults_the_source_path_and_refuses_other_gaps():
    example = tf.train.Example.FromString(encode_example(**RECORD))
    del example.features.feature["source_path"]
    without_source = example.SerializeToString()
    assert parse_example(without_source)["source_path"] == b""
    assert tf.io.parse_single_example(without_source, FEATURES)["source_path"].numpy() == b""
    del example.features.feature["id"]
    with pytest.raises(DatasetError, match="the example has no feature 'id'"):
        parse_example(example.SerializeToString())
    example = tf.train.Example.FromString(encode_example(**RECORD))
    example.features.feature["label"].int64_list.value.append(2)
    with pytest.raises(DatasetError, match="feature 'label' of the example holds 2 values "
                                           r"\(expected 1 int64\)"):
        parse_example(example.SerializeToString())


def test_file_names():
    assert shard_file_name("train", 3, 16) == "train-00003-of-00016.tfrecord"
    assert SHARD_FILE_PATTERN.match(shard_file_name("validation_2", 0, 1))
    assert fnmatch.fnmatch(shard_file_name("test", 12, 40), shard_file_glob("test"))
    assert not fnmatch.fnmatch(shard_file_name("train", 0, 1), shard_file_glob("test"))
    assert DEAD_LETTERS_NAME == "dead_letters-00000-of-00001.jsonl"
    assert is_dataset_file(shard_file_name("train", 0, 2)) and is_dataset_file(DEAD_LETTERS_NAME)
    for other in (MANIFEST_NAME, f"{MANIFEST_NAME}.tmp-0123", "beam-temp-x", "notes.txt",
                  "train-0-of-1.tfrecord"):
        assert not is_dataset_file(other), other


@pytest.mark.parametrize("root", ["local", "ram://datasets"])
def test_load_manifest_and_the_shards_of_a_split(tmp_path, root):
    """Local folders and ``scheme://`` paths (``gs://`` in use; TensorFlow's in-memory file
    system here) are read alike."""
    directory = str(tmp_path / "data") if root == "local" else f"{root}/{tmp_path.name}"
    tf.io.gfile.makedirs(directory)
    written = _write_dataset(directory, {"train": [3, 0, 2], "test": [1]})
    manifest = load_manifest(directory)
    assert manifest == {**written, "directory": directory}
    assert split_shards(manifest, "train") == [
        (f"{directory}/train-00000-of-00003.tfrecord", 3),
        (f"{directory}/train-00002-of-00003.tfrecord", 2)]  # the empty shard is skipped
    assert split_files(manifest, "test") == [f"{directory}/test-00000-of-00001.tfrecord"]


def test_load_manifest_refuses_unfinished_or_damaged_datasets(tmp_path):
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        load_manifest(str(tmp_path))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    manifest = _write_dataset(str(damaged), {"train": [2, 1]})
    shard = manifest["splits"]["train"]["shards"][0]["file"]
    (damaged / shard).write_bytes((damaged / shard).read_bytes()[:-5])
    with pytest.raises(DatasetError, match=f"{shard} has .* bytes but the manifest records"):
        load_manifest(str(damaged))
    (damaged / shard).unlink()
    with pytest.raises(DatasetError, match="missing"):
        load_manifest(str(damaged))
    assert load_manifest(str(damaged), verify_shards=False)["splits"] == manifest["splits"]
    with pytest.raises(DatasetError, match="split 'validation' is not in"):
        split_shards(load_manifest(str(damaged), verify_shards=False), "validation")
    with pytest.raises(DatasetError, match="split 'validation' is not in"):
        split_files(load_manifest(str(damaged), verify_shards=False), "validation")


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"format_version": 2}), r"unsupported format_version 2 \(expected one of \(1,\)\)"),
    (json.dumps([1]), "unsupported format_version None"),
    (json.dumps({"format_version": 1, "image_shape": [4, 4, 3], "class_names": [],
                 "splits": {}}), "missing field 'train_statistics'"),
])
def test_load_manifest_names_what_is_wrong_with_the_manifest(tmp_path, text, message):
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(DatasetError, match=message):
        load_manifest(str(tmp_path))


def test_square_crop_and_resize_is_the_centred_square_resized():
    image = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    np.testing.assert_array_equal(square_crop_and_resize(image).numpy(), image[:, 2:8])
    np.testing.assert_array_equal(square_crop_and_resize(image, 6).numpy(), image[:, 2:8])
    resized = square_crop_and_resize(image, 3)
    assert resized.dtype == tf.uint8 and resized.shape == (3, 3, 3)
    expected = tf.image.resize(image[:, 2:8], [3, 3], method="bicubic", antialias=True)
    np.testing.assert_array_equal(
        resized.numpy(), np.clip(np.round(expected.numpy()), 0, 255).astype(np.uint8))
