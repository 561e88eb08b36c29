"""The batch embedding job: RunInference over an export, on the real DirectRunner, and its
transforms one at a time in ``TestPipeline``s."""

import io
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_jobs.dataset_format import DatasetError, encode_example
from beam_jobs.embed import _example_to_item, _to_example, _to_row, _ToPixels, _WriteProjector, run
from beam_jobs.images import InvalidImage, decode_image, encode_png, square_and_resize

DIGITS = [str(digit) for digit in range(10)]


def _records(output):
    rows = {}
    for name in os.listdir(output):
        if name.startswith("embeddings") and name.endswith(".tfrecord"):
            for record in tf.data.TFRecordDataset(os.path.join(output, name)):
                feature = tf.train.Example.FromString(record.numpy()).features.feature
                rows[feature["id"].bytes_list.value[0].decode()] = (
                    feature["label"].int64_list.value[0],
                    np.array(feature["embedding"].float_list.value, np.float32),
                    feature["class_name"].bytes_list.value[0].decode())
    return rows


def test_prepared_split_is_embedded_once_per_example(exported, digits16, tmp_path):
    _, _, model_dir = exported
    output = str(tmp_path / "emb")
    count = run(["--model", model_dir, "--input", digits16["directory"], "--split", "test",
                 "--output", output, "--parquet", "--projector-samples", "20"])
    rows = _records(output)
    assert count == len(rows) == digits16["splits"]["test"]["num_examples"]

    # ids and labels match the dataset; embeddings equal direct calls of the signature
    from beam_jobs.dataset_format import decode_example

    examples = {}
    for shard in digits16["splits"]["test"]["shards"]:
        for record in tf.data.TFRecordDataset(os.path.join(digits16["directory"], shard["file"])):
            image, label = decode_example(record, digits16["image_shape"])
            example_id = tf.train.Example.FromString(record.numpy()).features.feature[
                "id"].bytes_list.value[0].decode()
            examples[example_id] = (image.numpy(), int(label))
    assert set(rows) == set(examples)
    ids = sorted(examples)[:16]
    direct = tf.saved_model.load(model_dir).signatures["embed_pixels"](
        images=tf.constant(np.stack([examples[i][0] for i in ids])))["embedding"].numpy()
    for example_id, expected in zip(ids, direct):
        assert rows[example_id][0] == examples[example_id][1]
        np.testing.assert_allclose(rows[example_id][1], expected, atol=1e-5)

    import pyarrow.parquet as pq

    (parquet,) = [n for n in os.listdir(output) if n.endswith(".parquet")]
    table = pq.read_table(os.path.join(output, parquet))
    assert table.num_rows == count and set(table.column_names) == {
        "id", "label", "class_name", "source_path", "embedding"}
    assert all(path.startswith("sklearn.datasets.load_digits[")
               for path in table.column("source_path").to_pylist())

    # embed_info.json names the export and the digest of the weights that made the embeddings
    info = json.load(open(os.path.join(output, "embed_info.json")))
    export_info = json.load(open(os.path.join(model_dir, "assets.extra", "ascl_export.json")))
    assert info["weights_sha256"] == export_info["weights_sha256"]
    assert len(info["weights_sha256"]) == 64 and info["count"] == count
    assert info["model"] == os.path.abspath(model_dir) and info["split"] == "test"
    assert sorted(set(table.column("class_name").to_pylist())) == [str(d) for d in range(10)]
    projector = os.path.join(output, "projector")
    assert len(open(os.path.join(projector, "vectors.tsv")).read().splitlines()) == 20
    assert os.path.exists(os.path.join(projector, "projector_config.pbtxt"))
    sample = open(os.path.join(projector, "metadata.tsv")).read()

    # a non-empty output is refused; with --overwrite it is replaced, and the projector's
    # sample is the same as before (chosen by a hash of the ids, not at random)
    with pytest.raises(FileExistsError, match="is not empty.*--overwrite"):
        run(["--model", model_dir, "--input", digits16["directory"], "--split", "test",
             "--output", output])
    assert run(["--model", model_dir, "--input", digits16["directory"], "--split", "test",
                "--output", output, "--projector-samples", "20", "--overwrite"]) == count
    assert open(os.path.join(projector, "metadata.tsv")).read() == sample
    assert not [n for n in os.listdir(output) if n.endswith(".parquet")]  # old outputs gone


def test_folder_input_with_a_corrupt_file(exported, tmp_path):
    _, _, model_dir = exported
    root = tmp_path / "images"
    for folder in ("3", "7", "not_a_digit"):
        (root / folder).mkdir(parents=True)
    for index in range(3):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (24, 20, 3), np.uint8)).save(
            buffer, format="PNG")
        folder = ("3", "7", "not_a_digit")[index]
        (root / folder / f"{index}.png").write_bytes(buffer.getvalue())
    (root / "3" / "broken.jpg").write_bytes(b"nope")
    output = str(tmp_path / "out")
    assert run(["--model", model_dir, "--input", f"folder:{root}", "--output", output,
                "--projector-samples", "0"]) == 3
    rows = _records(output)
    # labels come from the class folders, by the export's class names (the digits)
    assert {key: label for key, (label, _, _) in rows.items()} == {
        "3/0.png": 3, "7/1.png": 7, "not_a_digit/2.png": -1}
    assert rows["not_a_digit/2.png"][2] == "not_a_digit"  # a new class keeps its folder name
    (dead,) = [n for n in os.listdir(output) if n.startswith("dead_letters")]
    reasons = [json.loads(line) for line in open(os.path.join(output, dead))]
    assert len(reasons) == 1 and reasons[0]["path"].endswith("broken.jpg")


def test_unknown_split_is_named(exported, digits16, tmp_path):
    _, _, model_dir = exported
    with pytest.raises(ValueError, match="--split 'validation'"):
        run(["--model", model_dir, "--input", digits16["directory"], "--split", "validation",
             "--output", str(tmp_path / "x")])


def test_input_that_is_not_a_whole_prepared_dataset_is_refused(exported, digits16, tmp_path):
    import shutil

    _, _, model_dir = exported
    with pytest.raises(DatasetError, match="is not a prepared dataset"):
        run(["--model", model_dir, "--input", str(tmp_path / "nothing"),
             "--output", str(tmp_path / "x")])
    damaged = tmp_path / "damaged"
    shutil.copytree(digits16["directory"], damaged)
    shard = damaged / digits16["splits"]["test"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DatasetError, match=f"{shard.name} has .* bytes but the manifest records"):
        run(["--model", model_dir, "--input", str(damaged), "--output", str(tmp_path / "y")])


# ---- the job's transforms, the Beam way: TestPipeline, assert_that, equal_to


def _direct():
    return test_pipeline.TestPipeline(runner="DirectRunner")  # Prism, the default, downloads


def _png(seed, shape):
    return encode_png(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


def _key(example_id, label, class_name, source_path):
    return json.dumps({"id": example_id, "label": label, "class_name": class_name,
                       "source_path": source_path}, sort_keys=True)


def _as_bytes(key, pixels):
    """Pixels as comparable values (equal_to cannot compare arrays)."""
    return key, np.asarray(pixels).shape, np.asarray(pixels).tobytes()


def test_folder_images_are_resized_labelled_by_the_export_or_dead_letters():
    items = [{"id": "3/0.png", "source_path": "/i/3/0.png", "class_name": "3",
              "data": _png(0, (24, 20, 3))},
             {"id": "cat/1.png", "source_path": "/i/cat/1.png", "class_name": "cat",
              "data": _png(1, (16, 16, 3))},
             {"id": "3/broken.jpg", "source_path": "/i/3/broken.jpg", "class_name": "3",
              "data": b"nope"}]
    with pytest.raises(InvalidImage) as broken:
        decode_image(b"nope")
    expected = [_as_bytes(_key(item["id"], label, item["class_name"], item["source_path"]),
                          square_and_resize(decode_image(item["data"]), 16))
                for item, label in zip(items, (3, -1))]
    with _direct() as pipeline:
        decoded = (pipeline | beam.Create(items)
                   | beam.ParDo(_ToPixels(16, DIGITS)).with_outputs("dead", main="valid"))
        assert_that(decoded.valid | beam.MapTuple(_as_bytes), equal_to(expected), label="Valid")
        assert_that(decoded.dead, equal_to([{"path": "/i/3/broken.jpg",
                                             "reason": str(broken.value)}]), label="Dead")
    assert expected[0][1] == (16, 16, 3)


def test_prepared_records_are_keyed_and_labelled_by_the_export():
    def record(example_id, class_name, label, source_path="/i/x.png", seed=0):
        return encode_example(png=_png(seed, (8, 8, 3)), shape=(8, 8, 3), label=label,
                              class_name=class_name, example_id=example_id,
                              source_path=source_path, split="test")

    records = [record("test/7/0", "7", 0, seed=1), record("test/cat/1", "cat", 1, seed=2)]
    without_source = tf.train.Example.FromString(record("test/3/2", "3", 2, seed=3))
    del without_source.features.feature["source_path"]  # a record without one reads as ""
    records.append(without_source.SerializeToString())
    expected = [
        _as_bytes(_key("test/7/0", 7, "7", "/i/x.png"), decode_image(_png(1, (8, 8, 3)))),
        _as_bytes(_key("test/cat/1", -1, "cat", "/i/x.png"), decode_image(_png(2, (8, 8, 3)))),
        _as_bytes(_key("test/3/2", 3, "3", ""), decode_image(_png(3, (8, 8, 3))))]
    with _direct() as pipeline:
        items = pipeline | beam.Create(records) | beam.Map(_example_to_item, DIGITS)
        assert_that(items | beam.MapTuple(_as_bytes), equal_to(expected))


def test_embeddings_become_examples_and_parquet_rows():
    key = _key("test/7/0", 7, "7", "/i/7/0.png")
    embedding = np.array([0.25, -0.5, 1.0], np.float32)

    def parsed(serialized):
        feature = tf.train.Example.FromString(serialized).features.feature
        return (feature["id"].bytes_list.value[0], feature["label"].int64_list.value[0],
                feature["class_name"].bytes_list.value[0],
                feature["source_path"].bytes_list.value[0],
                list(feature["embedding"].float_list.value))

    with _direct() as pipeline:
        embeddings = pipeline | beam.Create([(key, embedding)])
        assert_that(embeddings | beam.MapTuple(_to_example) | beam.Map(parsed), equal_to([
            (b"test/7/0", 7, b"7", b"/i/7/0.png", [0.25, -0.5, 1.0])]), label="Examples")
        assert_that(embeddings | beam.MapTuple(_to_row), equal_to([
            {"id": "test/7/0", "label": 7, "class_name": "7", "source_path": "/i/7/0.png",
             "embedding": [0.25, -0.5, 1.0]}]), label="Rows")


def test_projector_files_list_the_sample_in_a_fixed_order(tmp_path):
    sample = [(_key("b", -1, "", ""), [0.5, 0.25]), (_key("a", 2, "two", "/a"), [1.0, 0.0]),
              (_key("c", 1, "", "/c"), [0.0, -1.0])]
    directory = tmp_path / "projector"
    with _direct() as pipeline:
        written = (pipeline | beam.Create([sample])
                   | beam.ParDo(_WriteProjector(str(directory), ["zero", "one", "two"])))
        assert_that(written, equal_to([3]))
    # rows in the order of the keys' JSON text (class_name first: "" before "two"), so a rerun
    # writes the same files
    assert (directory / "vectors.tsv").read_text() == (
        "0.500000\t0.250000\n0.000000\t-1.000000\n1.000000\t0.000000\n")
    # the class: the key's name, else the export's name of the label, else "unlabelled"
    assert (directory / "metadata.tsv").read_text() == (
        "id\tlabel\tclass\nb\t-1\tunlabelled\nc\t1\tone\na\t2\ttwo\n")
    assert 'tensor_path: "vectors.tsv"' in (directory / "projector_config.pbtxt").read_text()
