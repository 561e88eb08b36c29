"""Similar-image search: a gallery exported as variables, searched exactly with stock ops."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipeline.export import export_run
from pipeline.gallery import Gallery, GalleryError, GalleryIndex, brute_force_search, read_gallery


@pytest.fixture(scope="module")
def searchable(exported, digits16, tmp_path_factory):
    """The normal flow: embed the train split with version 1 of a run, then export version 2
    of the same run and checkpoint with that gallery (k 10).  Returns a dict of paths."""
    from beam_jobs.embed import run as embed

    run_dir, base, version_1 = exported
    root = tmp_path_factory.mktemp("gallery")
    gallery = str(root / "train_embeddings")
    embed(["--model", version_1, "--input", digits16["directory"], "--split", "train",
           "--output", gallery, "--projector-samples", "0"])
    version_2 = export_run(run_dir, name="digits_search", base_dir=base, gallery=gallery, k=10)
    return {"run_dir": run_dir, "base": base, "plain": version_1, "model": version_2,
            "gallery": gallery, "root": root}


def _test_pngs(digits16, count):
    from pipeline.prepared_dataset import read_split

    images = [image for image, _ in read_split(digits16, "test").take(count).as_numpy_iterator()]
    return [tf.io.encode_png(image).numpy() for image in images]


def _clean_process(script, cwd):
    """Runs ``script`` in a Python that never imports the project; its stdout parsed as JSON."""
    guard = ("import sys\n"
             "def _check():\n"
             "    assert not any(m.split('.')[0] in ('models', 'pipeline', 'beam_jobs')\n"
             "                   for m in sys.modules), 'the project was imported'\n")
    result = subprocess.run([sys.executable, "-c", guard + script + "\n_check()\n"],
                            capture_output=True, text=True, cwd=str(cwd))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_clean_process_gets_the_numpy_brute_force_neighbours(searchable, digits16, tmp_path):
    pngs = _test_pngs(digits16, 12)
    np.save(tmp_path / "pngs.npy", np.array(pngs, dtype=object), allow_pickle=True)
    served = _clean_process(
        "import json, numpy as np, tensorflow as tf\n"
        f"model = tf.saved_model.load({searchable['model']!r})\n"
        f"pngs = np.load({str(tmp_path / 'pngs.npy')!r}, allow_pickle=True).tolist()\n"
        "out = model.signatures['neighbors'](image_bytes=tf.constant(pngs))\n"
        "emb = model.signatures['serving_default'](image_bytes=tf.constant(pngs))['embedding']\n"
        "again = model.signatures['neighbors_of_embedding'](embedding=emb * 3.0)\n"
        "print(json.dumps({'ids': out['ids'].numpy().astype(str).tolist(),\n"
        "                  'scores': out['scores'].numpy().tolist(),\n"
        "                  'labels': out['labels'].numpy().tolist(),\n"
        "                  'again_ids': again['ids'].numpy().astype(str).tolist(),\n"
        "                  'again_scores': again['scores'].numpy().tolist(),\n"
        "                  'embedding': emb.numpy().tolist()}))", tmp_path)
    gallery = read_gallery(searchable["gallery"])
    order, scores = brute_force_search(np.array(served["embedding"]), gallery.embeddings, 10)
    expected_ids = gallery.ids[order].astype(str).tolist()
    assert served["ids"] == expected_ids and served["again_ids"] == expected_ids
    np.testing.assert_allclose(served["scores"], scores, atol=1e-5)
    np.testing.assert_allclose(served["again_scores"], scores, atol=1e-5)
    assert served["labels"] == gallery.labels[order].tolist()
    assert all(s == sorted(s, reverse=True) for s in served["scores"])
    # a query that is in the gallery finds itself first, with cosine 1
    train_image = next(iter(__import__("pipeline.prepared_dataset", fromlist=["read_split"])
                            .read_split(digits16, "train", with_ids=True).take(1)))
    out = tf.saved_model.load(searchable["model"]).signatures["neighbors"](
        image_bytes=tf.constant([tf.io.encode_png(train_image[0]).numpy()]))
    assert out["ids"][0, 0].numpy().decode() == train_image[2].numpy().decode()
    assert out["scores"][0, 0].numpy() == pytest.approx(1.0, abs=1e-5)


def test_signatures_shapes_and_the_unchanged_ones(searchable, digits16):
    model = tf.saved_model.load(searchable["model"])
    assert set(model.signatures) == {"serving_default", "embed_pixels", "neighbors",
                                     "neighbors_of_embedding"}
    neighbors = model.signatures["neighbors"]
    assert neighbors.structured_input_signature[1]["image_bytes"].dtype == tf.string
    outputs = neighbors.structured_outputs
    assert outputs["ids"].dtype == tf.string and outputs["ids"].shape.as_list() == [None, 10]
    assert outputs["scores"].dtype == tf.float32 and outputs["labels"].dtype == tf.int64
    spec = model.signatures["neighbors_of_embedding"].structured_input_signature[1]["embedding"]
    assert spec.shape.as_list() == [None, 128] and spec.dtype == tf.float32
    # serving_default and embed_pixels answer exactly as the export without a gallery does
    plain = tf.saved_model.load(searchable["plain"])
    pngs = tf.constant(_test_pngs(digits16, 4))
    for name in ("embedding", "projection"):
        np.testing.assert_array_equal(model.signatures["serving_default"](image_bytes=pngs)[name],
                                      plain.signatures["serving_default"](image_bytes=pngs)[name])
    # neighbors decodes through the same guard as serving_default: a bomb is refused
    from tests.pipeline.test_image_guard import _png

    with pytest.raises(tf.errors.InvalidArgumentError, match="30000 x 30000 pixels"):
        model.signatures["neighbors"](image_bytes=tf.constant([_png(30000, 30000, rows=4)]))
    # a wrong width is refused at run time, as embed_pixels refuses a wrong image shape
    with pytest.raises(tf.errors.InvalidArgumentError, match="shape \\[batch, 128\\]"):
        model.signatures["neighbors_of_embedding"](embedding=tf.zeros([2, 64]))
    for bad in (np.zeros([1, 128], np.float32), np.full([1, 128], np.nan, np.float32)):
        with pytest.raises(tf.errors.InvalidArgumentError, match="finite and not all zero"):
            model.signatures["neighbors_of_embedding"](embedding=tf.constant(bad))


def test_the_gallery_is_variables_of_the_version_not_graph_constants(searchable):
    model_dir = searchable["model"]
    gallery = read_gallery(searchable["gallery"])
    graph_bytes = os.path.getsize(os.path.join(model_dir, "saved_model.pb"))
    plain_bytes = os.path.getsize(os.path.join(searchable["plain"], "saved_model.pb"))
    assert graph_bytes - plain_bytes < gallery.embeddings.nbytes / 4
    loaded = tf.saved_model.load(model_dir)
    stored = {v.name.split(":")[0].split("/")[-1]: v for v in loaded.gallery}
    np.testing.assert_allclose(stored["embeddings"].numpy(), gallery.embeddings, atol=1e-7)
    assert stored["ids"].numpy().tolist() == gallery.ids.tolist()
    np.testing.assert_allclose(np.linalg.norm(stored["embeddings"].numpy(), axis=1), 1, atol=1e-5)
    assert all(p.startswith(b"sklearn.datasets.load_digits[") for p in stored["paths"].numpy())
    info = json.load(open(os.path.join(model_dir, "assets.extra", "ascl_export.json")))
    assert info["gallery"]["size"] == len(gallery) and info["gallery"]["k"] == 10
    assert info["gallery"]["embedded_by"]["weights_sha256"] == info["weights_sha256"]
    assert "neighbors" in info["signatures"]


def _ops_in(saved_model_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString(
        open(os.path.join(saved_model_dir, "saved_model.pb"), "rb").read())
    ops = set()
    for graph in proto.meta_graphs:
        ops |= {node.op for node in graph.graph_def.node}
        for function in graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    return ops


def test_every_op_of_every_exported_function_is_registered_by_stock_tensorflow(searchable,
                                                                               tmp_path):
    ops = sorted(_ops_in(searchable["model"]) | _ops_in(searchable["plain"]))
    assert {"MatMul", "TopKV2"} <= set(ops) or {"BatchMatMulV2", "TopKV2"} <= set(ops)
    unregistered = _clean_process(
        "import json, tensorflow as tf\n"
        "from tensorflow.python.framework import op_def_registry\n"
        f"print(json.dumps([op for op in {ops!r} if op_def_registry.get(op) is None]))",
        tmp_path)
    assert unregistered == []
    # the check itself can fail: an op outside stock TensorFlow is reported
    missing = _clean_process(
        "import json\nfrom tensorflow.python.framework import op_def_registry\n"
        "print(json.dumps([op for op in ['MatMul', 'ScannSearchBatched']\n"
        "                  if op_def_registry.get(op) is None]))", tmp_path)
    assert missing == ["ScannSearchBatched"]


def test_ties_are_broken_by_gallery_order():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 8)).astype(np.float32)
    embeddings = np.concatenate([base, base, base])  # rows i, i+3, i+6 are equal
    gallery = Gallery(embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True),
                      np.array([f"id{i}".encode() for i in range(9)], object),
                      np.arange(9, dtype=np.int64), np.array([b""] * 9, object))
    index = GalleryIndex(gallery, k=9)
    out = index.search(tf.constant(gallery.embeddings[[1]]))
    order, _ = brute_force_search(gallery.embeddings[[1]], gallery.embeddings, 9)
    assert out["labels"].numpy()[0, :3].tolist() == [1, 4, 7] == order[0, :3].tolist()
    assert out["labels"].numpy()[0].tolist() == order[0].tolist()


def test_bfloat16_storage_keeps_the_neighbours(searchable, digits16):
    gallery = read_gallery(searchable["gallery"])
    queries = gallery.embeddings[:200] + np.random.default_rng(1).normal(
        0, 0.05, (200, gallery.embeddings.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact, _ = brute_force_search(queries, gallery.embeddings, 10)
    def recall(storage):
        ids = GalleryIndex(gallery, 10, storage).search(tf.constant(queries))["ids"].numpy()
        return np.mean([len(set(ids[i]) & set(gallery.ids[exact[i]])) / 10 for i in range(200)])

    # one epoch on the digits leaves the gallery's cosines crowded near 1, a hard case for
    # bfloat16 (the recall on synthetic galleries up to 1M is in BENCHMARKS.md); float32 is
    # exact
    assert recall("float32") == 1.0
    assert recall("bfloat16") >= 0.95
    assert GalleryIndex(gallery, 10, "bfloat16").embeddings.dtype == tf.bfloat16


def test_a_bfloat16_export_searches_the_float32_gallery(searchable, digits16):
    """--precision bfloat16 with a gallery embedded by the float32 version 1: accepted (same
    weights), and its `neighbors` mostly agree with the float32 export's; the scores are the
    cosines of its own (bfloat16-computed) query embeddings."""
    path = export_run(searchable["run_dir"], name="digits_search_bf16",
                      base_dir=searchable["base"], gallery=searchable["gallery"], k=10,
                      precision="bfloat16")
    request = tf.constant(_test_pngs(digits16, 32))
    bf16 = tf.saved_model.load(path).signatures["neighbors"](image_bytes=request)
    f32 = tf.saved_model.load(searchable["model"]).signatures["neighbors"](image_bytes=request)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in
                       zip(bf16["ids"].numpy(), f32["ids"].numpy())])
    assert overlap >= 0.8
    assert bf16["scores"].dtype == tf.float32
    assert np.all(np.diff(bf16["scores"].numpy(), axis=1) <= 1e-6)  # descending


# --- export-time errors ------------------------------------------------------------------

def _write_embed_folder(folder, ids, embeddings, weights_sha256, labels=None):
    os.makedirs(folder, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(folder, "embeddings-00000-of-00001.tfrecord")) as w:
        for index, (example_id, vector) in enumerate(zip(ids, embeddings)):
            example = tf.train.Example()
            feature = example.features.feature
            feature["id"].bytes_list.value.append(example_id.encode())
            feature["label"].int64_list.value.append(-1 if labels is None else labels[index])
            feature["embedding"].float_list.value.extend(np.asarray(vector).tolist())
            w.write(example.SerializeToString())
    with open(os.path.join(folder, "embed_info.json"), "w") as handle:
        json.dump({"weights_sha256": weights_sha256, "model": "fabricated"}, handle)
    return folder


def _digest(searchable):
    return json.load(open(os.path.join(searchable["plain"], "assets.extra",
                                       "ascl_export.json")))["weights_sha256"]


@pytest.mark.parametrize("case, match", [
    ("width", "are 64-d but the model's embeddings are 128-d"),
    ("empty", "is empty"),
    ("duplicates", "2 duplicate ids \\(e.g. a, b\\)"),
    ("k", "--k 11 must be between 1 and the gallery's size \\(10\\)"),
    ("weights", "embedded by other weights"),
    ("no_info", "has no embed_info.json"),
    ("not_finite", "all zero or not finite"),
    ("nan", "all zero or not finite"),
    ("no_digest", "does not record the weights that made it"),
])
def test_bad_galleries_are_refused_at_export_time(searchable, tmp_path, case, match):
    rng = np.random.default_rng(0)
    digest = _digest(searchable)
    ids = [f"x{i}" for i in range(10)]
    vectors = rng.normal(size=(10, 128))
    folder = str(tmp_path / case)
    if case == "width":
        _write_embed_folder(folder, ids, rng.normal(size=(10, 64)), digest)
    elif case == "empty":
        _write_embed_folder(folder, [], [], digest)
    elif case == "duplicates":
        _write_embed_folder(folder, ["a", "a", "b", "b", "c"], vectors[:5], digest)
    elif case == "weights":
        _write_embed_folder(folder, ids, vectors, "0" * 64)
    elif case == "no_info":
        _write_embed_folder(folder, ids, vectors, digest)
        os.remove(os.path.join(folder, "embed_info.json"))
    elif case == "not_finite":
        vectors[3] = 0.0
        _write_embed_folder(folder, ids, vectors, digest)
    elif case == "nan":
        vectors[4, 7] = np.nan
        _write_embed_folder(folder, ids, vectors, digest)
    elif case == "no_digest":
        _write_embed_folder(folder, ids, vectors, None)
    else:
        _write_embed_folder(folder, ids, vectors, digest)
    k = 11 if case == "k" else 5
    before = sorted(os.listdir(os.path.join(searchable["base"], "digits_search")))
    with pytest.raises(GalleryError, match=match):
        export_run(searchable["run_dir"], name="digits_search", base_dir=searchable["base"],
                   gallery=folder, k=k)
    assert sorted(os.listdir(os.path.join(searchable["base"], "digits_search"))) == before


def test_a_gallery_from_another_run_is_refused(searchable, digits16, tmp_path):
    """Weights that differ (another run of the same config) are caught by the digest."""
    from pipeline.train import train
    from tests.small_runs import small_config

    other = str(tmp_path / "other_run")
    train(small_config(digits16, "train.epochs=1", "train.knn_every=0", "train.view_images=0",
                       "train.seed=7"), other)
    with pytest.raises(GalleryError, match="embedded by other weights"):
        export_run(other, name="other", base_dir=str(tmp_path / "sm"),
                   gallery=searchable["gallery"])


def test_a_parquet_only_embed_folder_is_read_like_the_tfrecords(searchable, tmp_path):
    import pyarrow
    import pyarrow.parquet as pq

    gallery = read_gallery(searchable["gallery"])
    folder = tmp_path / "parquet_only"
    folder.mkdir()
    pq.write_table(pyarrow.table({
        "id": gallery.ids.astype(str).tolist(), "label": gallery.labels.tolist(),
        "source_path": gallery.paths.astype(str).tolist(),
        "embedding": gallery.embeddings.tolist()}), folder / "embeddings-00000-of-00001.parquet")
    (folder / "embed_info.json").write_text(json.dumps(gallery.info))
    again = read_gallery(str(folder))
    assert again.ids.tolist() == gallery.ids.tolist()
    np.testing.assert_allclose(again.embeddings, gallery.embeddings, atol=1e-6)


# --- ascl search ---------------------------------------------------------------------------

def test_ascl_search_prints_the_neighbours_and_draws_a_sheet(searchable, digits16, tmp_path,
                                                             capsys):
    from pipeline.cli import main

    image = tmp_path / "query.png"
    image.write_bytes(_test_pngs(digits16, 1)[0])
    sheet = tmp_path / "sheet.png"
    assert main(["search", "--model", searchable["model"], "--image", str(image), "--k", "4",
                 "--sheet", str(sheet)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["rank", "score", "label", "class", "id", "path"]
    rows = [line.split() for line in printed[1:5]]
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    scores = [float(row[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    direct = tf.saved_model.load(searchable["model"]).signatures["neighbors"](
        image_bytes=tf.constant([image.read_bytes()]))
    assert [row[4] for row in rows] == [i.decode() for i in direct["ids"][0, :4].numpy()]
    assert [row[5] for row in rows] == [p.decode() for p in direct["paths"][0, :4].numpy()]
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "contact sheet" in printed[-1]
    # more neighbours than the export holds, an export without a gallery: clear errors
    assert main(["search", "--model", searchable["model"], "--image", str(image),
                 "--k", "11"]) == 2
    assert "--k 11 must be between 1 and the k the export was made with (10)" in \
        capsys.readouterr().err
    bomb = tmp_path / "bomb.png"
    from tests.pipeline.test_image_guard import _png

    bomb.write_bytes(_png(30000, 30000, rows=4))
    assert main(["search", "--model", searchable["model"], "--image", str(bomb)]) == 2
    assert "the model refused it: image of 30000 x 30000 pixels" in capsys.readouterr().err
    assert main(["search", "--model", searchable["plain"], "--image", str(image)]) == 2
    assert "no `neighbors` signature" in capsys.readouterr().err
