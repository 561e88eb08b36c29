"""The batch embedding job: RunInference over an export, on the real DirectRunner."""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from beam_jobs.embed import run


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
    from pipeline.prepared_dataset import decode_example

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
