"""The preparation job on the real DirectRunner, over image trees made here, and its
transforms one at a time in ``TestPipeline``s."""

import hashlib
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

from beam_jobs.dataset_format import (
    DEAD_LETTERS_NAME,
    MANIFEST_NAME,
    decode_example,
    encode_example,
    load_manifest,
)
from beam_jobs.images import InvalidImage, decode_image, encode_png, square_and_resize
from beam_jobs.prepare import (
    ChannelMeanStd,
    ToExample,
    WriteManifest,
    WriteShard,
    order_key,
    run,
    shard_count,
    shard_of,
)
from beam_jobs.sources import digit_images, hashed_split
from beam_jobs.tfrecord import encode_record
from pipeline.prepared_dataset import read_split

SIZE = 16


def _pixels(seed, size=SIZE):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _write(root, relative, data):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """Valid images in every convertible mode plus four kinds of bad file.

    Returns the root and, for lossless inputs, the RGB pixels each id should read back as.
    """
    root = tmp_path_factory.mktemp("images")
    expected = {}
    for index in range(4):
        pixels = _pixels(index)
        _write(root, f"train/cat/{index}.png", _encode(Image.fromarray(pixels), "PNG"))
        expected[f"train/cat/{index}.png"] = pixels
    for index in range(3):
        _write(root, f"train/dog/{index}.jpg",
               _encode(Image.fromarray(_pixels(10 + index)), "JPEG"))
    gray = _pixels(20)[..., 0]
    _write(root, "test/cat/gray.png", _encode(Image.fromarray(gray, "L"), "PNG"))
    expected["test/cat/gray.png"] = np.repeat(gray[..., None], 3, axis=-1)
    rgba = np.concatenate([_pixels(21), np.full((SIZE, SIZE, 1), 128, np.uint8)], axis=-1)
    _write(root, "test/dog/rgba.png", _encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    expected["test/dog/rgba.png"] = rgba[..., :3]
    sixteen = (np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 257)
    _write(root, "train/cat/deep.png", _encode(Image.fromarray(sixteen, "I;16"), "PNG"))
    expected["train/cat/deep.png"] = np.repeat(
        (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 256).astype(np.uint8)[..., None], 3, -1)
    _write(root, "train/dog/cmyk.jpg",
           _encode(Image.fromarray(_pixels(22)).convert("CMYK"), "JPEG"))
    palette = Image.fromarray(_pixels(23)).convert("P")
    _write(root, "test/cat/palette.png", _encode(palette, "PNG"))
    expected["test/cat/palette.png"] = np.asarray(palette.convert("RGB"))
    # bad inputs
    jpeg = _encode(Image.fromarray(_pixels(30)), "JPEG")
    _write(root, "train/dog/truncated.jpg", jpeg[: len(jpeg) // 2])
    _write(root, "train/cat/empty.jpg", b"")
    _write(root, "test/dog/text.jpg", b"this is not an image\n")
    _write(root, "train/cat/tiny.png", _encode(Image.fromarray(_pixels(31, size=4)), "PNG"))
    return root, expected


def _read_all(manifest, split):
    """``{id: (pixels, label)}``: every record of a split, decoded as training decodes it."""
    examples = {}
    for shard in manifest["splits"][split]["shards"]:
        for record in tf.data.TFRecordDataset(os.path.join(manifest["directory"], shard["file"])):
            example = tf.train.Example.FromString(record.numpy())
            image, label = decode_example(record, manifest["image_shape"])
            examples[example.features.feature["id"].bytes_list.value[0].decode()] = (
                image.numpy(), int(label))
    return examples


@pytest.fixture(scope="module")
def prepared(image_tree, tmp_path_factory):
    root, _ = image_tree
    output = tmp_path_factory.mktemp("prepared") / "out"
    written = run(["--source", f"folder:{root}", "--output", str(output), "--num-shards", "3"])
    manifest = load_manifest(str(output))
    assert manifest["splits"] == written["splits"]
    return output, manifest


def test_counts_labels_and_nothing_lost(prepared):
    output, manifest = prepared
    assert manifest["class_names"] == ["cat", "dog"]
    assert manifest["image_shape"] == [SIZE, SIZE, 3]
    assert manifest["splits"]["train"]["num_examples"] == 9
    assert manifest["splits"]["test"]["num_examples"] == 3
    assert manifest["dead_letters"]["count"] == 4
    assert manifest["num_inputs"] == 16 == 9 + 3 + 4
    assert [s["file"] for s in manifest["splits"]["train"]["shards"]] == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    on_disk = json.loads((output / "manifest.json").read_text())
    assert on_disk["splits"] == manifest["splits"]


def test_dead_letters_name_path_and_reason(prepared):
    output, manifest = prepared
    (name,) = manifest["dead_letters"]["files"]
    lines = [json.loads(line) for line in (output / name).read_text().splitlines()]
    reasons = {os.path.basename(line["path"]): line["reason"] for line in lines}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "text.jpg", "tiny.png"}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["text.jpg"].startswith("undecodable bytes")
    assert reasons["truncated.jpg"].startswith("undecodable bytes")
    assert reasons["tiny.png"].startswith("too small: 4x4")


def test_pixels_and_labels_round_trip(prepared, image_tree):
    _, expected = image_tree
    _, manifest = prepared
    examples = {**_read_all(manifest, "train"), **_read_all(manifest, "test")}
    assert len(examples) == 12
    for example_id, pixels in expected.items():
        image, label = examples[example_id]
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(image, pixels, err_msg=example_id)
        assert label == (0 if "/cat/" in example_id else 1)
    assert examples["train/dog/cmyk.jpg"][0].shape == (SIZE, SIZE, 3)


def test_reader_yields_every_example_of_a_split(prepared):
    _, manifest = prepared
    expected = sorted((label, image.tobytes())
                      for image, label in _read_all(manifest, "train").values())
    dataset = read_split(manifest, "train")
    assert dataset.element_spec[0].shape == (SIZE, SIZE, 3)
    assert sorted((int(label), image.tobytes())
                  for image, label in dataset.as_numpy_iterator()) == expected


def test_shards_follow_the_id_hash_in_keyed_hash_order(prepared):
    output, manifest = prepared
    for shard in manifest["splits"]["train"]["shards"]:
        index = int(shard["file"].split("-")[1])
        ids = [tf.train.Example.FromString(r.numpy()).features.feature["id"].bytes_list.value[0]
               .decode() for r in tf.data.TFRecordDataset(str(output / shard["file"]))]
        assert ids == sorted(ids, key=order_key) and len(ids) == shard["num_examples"]
        assert all(shard_of(i, 3) == index for i in ids)
        data = (output / shard["file"]).read_bytes()
        assert shard["size_bytes"] == len(data)
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()


def test_train_statistics_match_numpy(prepared):
    _, manifest = prepared
    images = np.stack([image for image, _ in _read_all(manifest, "train").values()])
    pixels = images.reshape(-1, 3).astype(np.float64)
    stats = manifest["train_statistics"]
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=0), rtol=1e-9)


def test_two_runs_write_byte_identical_shards(prepared, image_tree, tmp_path):
    root, _ = image_tree
    output, first = prepared
    second = run(["--source", f"folder:{root}", "--output", str(tmp_path / "again"),
                  "--num-shards", "3"])
    for split in ("train", "test"):
        assert first["splits"][split] == second["splits"][split]
        for shard in first["splits"][split]["shards"]:
            assert (output / shard["file"]).read_bytes() == (
                tmp_path / "again" / shard["file"]).read_bytes()
    # every other output too, but the manifest's creation time
    assert sorted(p.name for p in output.iterdir()) == sorted(
        p.name for p in (tmp_path / "again").iterdir())
    for path in output.iterdir():
        if path.name != "manifest.json":
            assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), path.name
    dead = (output / "dead_letters-00000-of-00001.jsonl").read_text()
    assert " at 0x" not in dead and "undecodable" in dead
    manifests = [json.loads((folder / "manifest.json").read_text())
                 for folder in (output, tmp_path / "again")]
    for manifest in manifests:
        manifest.pop("created")
    assert manifests[0] == manifests[1]


def test_leftovers_of_a_killed_run_are_cleaned(image_tree, tmp_path):
    root, _ = image_tree
    output = tmp_path / "out"
    leftover = output / "beam-temp-dead_letters-0123456789abcdef"
    leftover.mkdir(parents=True)
    (leftover / "part").write_text("half-written")
    run(["--source", f"folder:{root}", "--output", str(output), "--num-shards", "3"])
    assert not [p for p in output.iterdir() if p.name.startswith("beam-temp-")]


def test_existing_dataset_is_refused_unless_overwrite(image_tree, tmp_path):
    root, _ = image_tree
    output = tmp_path / "out"
    args = ["--source", f"folder:{root}", "--output", str(output), "--num-shards", "2"]
    run(args)
    with pytest.raises(FileExistsError, match=f"{output}.*--overwrite"):
        run(args)
    manifest = run(args[:-1] + ["1", "--overwrite"])
    assert sorted(p.name for p in output.glob("*.tfrecord")) == [
        "test-00000-of-00001.tfrecord", "train-00000-of-00001.tfrecord"]
    assert manifest["splits"]["train"]["num_examples"] == 9


def test_class_folders_without_splits_get_a_hashed_test_split(tmp_path):
    root = tmp_path / "flat"
    for label in ("a", "b", "c"):
        for index in range(10):
            _write(root, f"{label}/nested/{index}.png",
                   _encode(Image.fromarray(_pixels(index)), "PNG"))
    manifest = run(["--source", f"folder:{root}", "--output", str(tmp_path / "out"),
                    "--test-fraction", "0.3", "--image-size", "8", "--layout", "class"])
    expected_test = sum(hashed_split(f"{label}/nested/{index}.png", 0.3) == "test"
                        for label in "abc" for index in range(10))
    assert 0 < expected_test < 30
    assert manifest["splits"]["test"]["num_examples"] == expected_test
    assert manifest["splits"]["train"]["num_examples"] == 30 - expected_test
    assert manifest["class_names"] == ["a", "b", "c"] and manifest["image_shape"] == [8, 8, 3]


def test_mixed_sizes_need_image_size(tmp_path):
    root = tmp_path / "mixed"
    _write(root, "train/a/0.png", _encode(Image.fromarray(_pixels(0, size=16)), "PNG"))
    _write(root, "train/a/1.png", _encode(Image.fromarray(_pixels(1, size=20)), "PNG"))
    with pytest.raises(Exception, match="--image-size"):
        run(["--source", f"folder:{root}", "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest = run(["--source", f"folder:{root}", "--output", str(tmp_path / "out2"),
                    "--image-size", "12"])
    assert manifest["image_shape"] == [12, 12, 3]


def test_shard_count_grows_with_the_data():
    mib = 2 ** 20
    # CIFAR-10's train split (~120 MiB of PNGs) by size alone would be 2 shards; 16 are enough
    # for 16 workers to read their own files
    assert shard_count(50_000, 120 * mib) == 16
    assert shard_count(50_000, 120 * mib, min_shards=4) == 4
    assert shard_count(10_000_000, 200 * 1024 * mib) == 3200  # by size: 64 MiB each
    assert shard_count(10_000, 100 * mib, shard_size_mb=1) == 100
    assert shard_count(1_437, 2 * mib) == 5  # no more forced shards than 256 examples each
    assert shard_count(50, mib // 10) == 1
    assert shard_count(50_000, 120 * mib, num_shards=3) == 3


def test_digits_source(tmp_path):
    run(["--output", str(tmp_path / "digits"), "--min-shards", "4"])
    manifest = load_manifest(str(tmp_path / "digits"))
    # 1797 digits in 64 KiB: min(4, n // 256) shards per split (at least one)
    assert [len(info["shards"]) for _, info in sorted(manifest["splits"].items())] == [1, 4]
    assert manifest["source"] == "digits" and manifest["num_inputs"] == 1797
    assert manifest["class_names"] == [str(d) for d in range(10)]
    counts = {split: info["num_examples"] for split, info in manifest["splits"].items()}
    assert sum(counts.values()) == 1797 and 250 < counts["test"] < 470
    images, labels = digit_images()
    examples = _read_all(manifest, "test")
    image, label = examples["digits/0000"] if "digits/0000" in examples else next(
        (v for k, v in _read_all(manifest, "train").items() if k == "digits/0000"))
    np.testing.assert_array_equal(image, images[0])
    assert label == labels[0]


def test_tfds_source_through_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        # mock_data ignores split slicing, so read each split as one slice
        run(["--source", "tfds:mnist:train,test", "--output", str(tmp_path / "mnist"),
             "--tfds-slices", "1"])
    manifest = load_manifest(str(tmp_path / "mnist"))
    assert manifest["class_names"] == [str(d) for d in range(10)]
    assert manifest["image_shape"] == [28, 28, 3]
    assert ({s: i["num_examples"] for s, i in manifest["splits"].items()}
            == {"train": 12, "test": 12})
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):  # the same mock examples, as TFDS gives them
        mocked = sorted((int(e["label"]), e["image"][..., 0].tobytes()) for e in tfds.as_numpy(
            tfds.load("mnist", split="train")))
    prepared = sorted((int(label), image[..., 0].tobytes())
                      for image, label in read_split(manifest, "train").as_numpy_iterator())
    assert prepared == mocked  # every image and label, grayscale turned into RGB
    image, _ = next(read_split(manifest, "train").as_numpy_iterator())
    np.testing.assert_array_equal(image[..., 0], image[..., 1])


@pytest.mark.parametrize("argv, message", [
    (["--source", "images"], "--source must be"),
    (["--image-size", "0"], "--image-size must be >= 1"),
    (["--test-fraction", "1.5"], "--test-fraction must be in"),
    (["--shard-size-mb", "0"], "--shard-size-mb must be > 0"),
    (["--min-shards", "0"], "--min-shards must be >= 1"),
    (["--source", "folder:/nonexistent/images"], "yielded no inputs|No files found"),
])
def test_bad_arguments_are_named(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        run(argv + ["--output", str(tmp_path / "x")])


def test_split_folders_with_unknown_names_need_a_layout(tmp_path):
    root = tmp_path / "tree"
    for split in ("training", "testing"):
        for label in ("cat", "dog"):
            _write(root, f"{split}/{label}/0.png", _encode(Image.fromarray(_pixels(1)), "PNG"))
    with pytest.raises(ValueError, match=r"\['testing', 'training'\].*--layout split/class"):
        run(["--source", f"folder:{root}", "--output", str(tmp_path / "auto")])
    as_splits = run(["--source", f"folder:{root}", "--output", str(tmp_path / "splits"),
                     "--layout", "split/class"])
    assert sorted(as_splits["splits"]) == ["testing", "training"]
    assert as_splits["class_names"] == ["cat", "dog"]
    as_classes = run(["--source", f"folder:{root}", "--output", str(tmp_path / "classes"),
                      "--layout", "class", "--test-fraction", "0"])
    assert as_classes["class_names"] == ["testing", "training"]


def test_overwrite_keeps_the_old_dataset_readable_until_the_new_one_is_complete(
        image_tree, tmp_path, monkeypatch):
    import beam_jobs.prepare as prepare_module

    root, _ = image_tree
    output = tmp_path / "out"
    old = run(["--source", f"folder:{root}", "--output", str(output), "--num-shards", "3"])
    old_files = {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()}

    def crash(self, *args, **kwargs):  # the job dies after the shards were written
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(prepare_module.WriteManifest, "process", crash)
    with pytest.raises(Exception, match="killed before the manifest"):
        run(["--source", f"folder:{root}", "--output", str(output), "--num-shards", "2",
             "--overwrite"])
    monkeypatch.undo()
    assert load_manifest(str(output))["splits"] == old["splits"]  # still whole and readable
    assert {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()} == old_files
    assert sum(1 for _ in read_split(str(output), "train")) == 9
    new = run(["--source", f"folder:{root}", "--output", str(output), "--num-shards", "2",
               "--overwrite"])
    assert len(new["splits"]["train"]["shards"]) == 2
    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["manifest.json", "dead_letters-00000-of-00001.jsonl"]
        + [f"{split}-0000{i}-of-00002.tfrecord" for split in ("test", "train") for i in (0, 1)])


def test_sigkill_during_overwrite_leaves_the_old_dataset_readable(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    output = tmp_path / "digits"
    old = run(["--source", "digits", "--image-size", "12", "--output", str(output)])
    command = [sys.executable, "-m", "beam_jobs.prepare", "--source", "digits",
               "--image-size", "16", "--output", str(output), "--overwrite", "--num-shards", "3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not (output / ".staging").exists():
        time.sleep(0.02)
    time.sleep(0.5)  # into the pipeline
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (output / ".staging").exists(), "the job must be killed mid-run for this test"
    manifest = load_manifest(str(output))  # the old dataset, whole
    assert manifest["image_shape"] == [12, 12, 3] and manifest["splits"] == old["splits"]
    assert sum(1 for _ in read_split(manifest, "train")) == old["splits"]["train"]["num_examples"]
    assert subprocess.run(command, capture_output=True).returncode == 0  # a rerun completes
    assert load_manifest(str(output))["image_shape"] == [16, 16, 3]
    assert not (output / ".staging").exists()


def test_an_example_lost_between_conversion_and_shards_fails_the_job(image_tree, tmp_path,
                                                                     monkeypatch):
    """The job counts the items entering the conversion on its own and refuses to write a
    manifest when examples plus dead letters fall short (a lossy runner or a bug)."""
    import beam_jobs.prepare as prepare_module

    root, _ = image_tree
    write = prepare_module.WriteShard.process

    def lossy(self, keyed_examples):
        key, examples = keyed_examples
        yield from write(self, (key, list(examples)[1:]))  # every shard drops one example

    monkeypatch.setattr(prepare_module.WriteShard, "process", lossy)
    with pytest.raises(Exception, match="prepare lost inputs"):
        run(["--source", f"folder:{root}", "--output", str(tmp_path / "out"),
             "--num-shards", "2"])
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_listing_a_local_tree_finds_the_folders_that_matching_finds(tmp_path, monkeypatch):
    """The layout check lists a local tree instead of matching every file; on object stores
    it matches.  Both agree: folders with files two levels down (not deeper folders)."""
    import beam_jobs.sources as sources

    for relative in ("train/cat/1.jpg", "test/dog/2.jpg", "flat/3.jpg", "deep/a/b/4.jpg",
                     "top.jpg"):
        _write(tmp_path, relative, b"x")
    (tmp_path / "hollow" / "empty").mkdir(parents=True)
    listed = sources._folders_holding_folders(str(tmp_path))
    assert listed == ["test", "train"]
    monkeypatch.setattr(sources.os.path, "isdir", lambda path: False)  # the matching branch
    assert listed == sources._folders_holding_folders(str(tmp_path))


def test_walking_a_local_tree_finds_the_files_that_matching_finds(tmp_path, monkeypatch):
    """A local tree is walked; elsewhere (gs://...) ``root/**`` is matched.  Both list the
    same files, hidden ones and deep ones included (forced down the matching branch here)."""
    import beam_jobs.sources as sources

    for relative in ("train/cat/1.jpg", "train/cat/.hidden", "test/deep/er/2.png", "top.jpg"):
        _write(tmp_path, relative, b"x")
    (tmp_path / "empty").mkdir()
    walked = sorted(sources.files_under(str(tmp_path)))
    assert [os.path.relpath(p, tmp_path) for p in walked] == [
        "test/deep/er/2.png", "top.jpg", "train/cat/.hidden", "train/cat/1.jpg"]
    monkeypatch.setattr(sources.os.path, "isdir", lambda path: False)
    assert sorted(sources.files_under(str(tmp_path))) == walked


def test_unreadable_and_compressed_files(tmp_path):
    """A file that cannot be read (a broken link) is a dead letter with the reason, not a
    crash and not a silent skip; a gzipped image is read decompressed, as Beam's ReadMatches
    reads files whose name says they are compressed."""
    import gzip

    root = tmp_path / "tree"
    for index in range(3):
        _write(root, f"train/cat/{index}.png", _encode(Image.fromarray(_pixels(index)), "PNG"))
    _write(root, "train/cat/zipped.png.gz",
           gzip.compress(_encode(Image.fromarray(_pixels(7)), "PNG")))
    (root / "train" / "cat" / "gone.png").symlink_to(root / "nowhere.png")
    output = tmp_path / "out"
    manifest = run(["--source", f"folder:{root}", "--output", str(output)])
    assert manifest["num_inputs"] == 5 and manifest["splits"]["train"]["num_examples"] == 4
    (name,) = manifest["dead_letters"]["files"]
    (line,) = [json.loads(line) for line in (output / name).read_text().splitlines()]
    assert line["path"].endswith("gone.png") and line["reason"].startswith(
        "could not read the file")


def test_per_bundle_reports_start_afresh_in_every_bundle():
    """ToExample reports shapes, sizes and moments once per bundle; nothing may carry over
    from one bundle into the next (a runner reuses the instance)."""
    from apache_beam.pvalue import TaggedOutput

    def item(index, split):
        return {"id": f"{split}/c/{index}", "source_path": f"/x/{index}", "split": split,
                "class_name": "c", "data": None, "pixels": _pixels(index, size=8)}

    convert = ToExample(image_size=None, min_size=4)

    def bundle(items):
        convert.start_bundle()
        out = [o for i in items for o in convert.process(i, ["c"])]
        reports = {}
        for tagged in convert.finish_bundle():
            assert isinstance(tagged, TaggedOutput)
            reports.setdefault(tagged.tag, []).append(tagged.value.value)
        return out, reports

    first, first_reports = bundle([item(0, "train"), item(1, "train"), item(2, "test")])
    second, second_reports = bundle([item(3, "train")])
    assert len(first) == 3 and len(second) == 1
    assert dict(first_reports["sizes"])["train"][0] == 2
    assert dict(second_reports["sizes"]) == {"train": (1, len(second[0]["example"]))}
    (moments,) = second_reports["moments"]
    pixels = _pixels(3, size=8).reshape(-1, 3).astype(np.int64)
    assert moments[0] == 64
    np.testing.assert_array_equal(moments[1], pixels.sum(0))
    np.testing.assert_array_equal(moments[2], (pixels ** 2).sum(0))


def test_the_lossy_multi_threaded_direct_mode_is_refused_before_any_work(image_tree, tmp_path):
    root, _ = image_tree
    with pytest.raises(ValueError, match="multi_threading.*lost examples"):
        run(["--source", f"folder:{root}", "--output", str(tmp_path / "out"),
             "--direct_num_workers", "2", "--direct_running_mode", "multi_threading"])
    assert not (tmp_path / "out").exists()


# ---- the job's transforms, the Beam way: TestPipeline, assert_that, equal_to


def _direct():
    return test_pipeline.TestPipeline(runner="DirectRunner")  # Prism, the default, downloads


def _checked_by(check):
    """An ``assert_that`` matcher that runs ``check(elements)``."""
    def matcher(elements):
        check(list(elements))
    return matcher


def test_to_example_tags_examples_dead_letters_and_reports():
    size, class_names = 8, ["cat", "dog"]
    square = _pixels(0, size=size)
    oblong = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    unlabelled = _pixels(2, size=size)

    def item(example_id, split, **source):
        return {"id": example_id, "source_path": f"/images/{example_id}", "split": split,
                "class_name": example_id.split("/")[1], "data": None, "pixels": None, **source}

    items = [item("train/cat/0.png", "train", data=_encode(Image.fromarray(square), "PNG")),
             item("train/dog/1", "train", pixels=oblong),
             item("test/bird/2", "test", pixels=unlabelled),
             item("train/cat/text.jpg", "train", data=b"this is not an image"),
             item("train/cat/empty.jpg", "train", data=b""),
             item("test/dog/tiny", "test", pixels=_pixels(3, size=4)),
             item("train/dog/gone.png", "train", unreadable="could not read the file: gone")]
    with pytest.raises(InvalidImage) as undecodable:
        decode_image(b"this is not an image")
    resized = square_and_resize(oblong, size)

    def example(item, pixels, label):
        return {"split": item["split"], "id": item["id"], "example": encode_example(
            png=encode_png(pixels), shape=pixels.shape, label=label,
            class_name=item["class_name"], example_id=item["id"],
            source_path=item["source_path"], split=item["split"])}

    examples = [example(items[0], square, 0), example(items[1], resized, 1),
                example(items[2], unlabelled, -1)]

    def dead(item, reason):
        return {"id": item["id"], "path": item["source_path"], "split": item["split"],
                "reason": reason}

    def sizes(reports):
        totals = {}
        for split, (count, size_bytes) in reports:
            totals[split] = tuple(map(sum, zip(totals.get(split, (0, 0)), (count, size_bytes))))
        assert totals == {"train": (2, len(examples[0]["example"]) + len(examples[1]["example"])),
                          "test": (1, len(examples[2]["example"]))}

    def moments(reports):
        train = np.concatenate([square.reshape(-1, 3), resized.reshape(-1, 3)]).astype(np.int64)
        assert sum(count for count, _, _ in reports) == len(train)
        np.testing.assert_array_equal(sum(total for _, total, _ in reports), train.sum(0))
        np.testing.assert_array_equal(sum(squares for _, _, squares in reports),
                                      (train ** 2).sum(0))

    with _direct() as pipeline:
        classes = pipeline | "Classes" >> beam.Create([class_names])
        results = (pipeline | beam.Create(items) | beam.ParDo(
            ToExample(image_size=size, min_size=6), class_names=beam.pvalue.AsSingleton(classes))
            .with_outputs(ToExample.DEAD, ToExample.SHAPE, ToExample.MOMENTS, ToExample.SIZES,
                          main="valid"))
        assert_that(results.valid, equal_to(examples), label="Examples")
        assert_that(results.dead, equal_to([
            dead(items[3], str(undecodable.value)), dead(items[4], "empty file"),
            dead(items[5], "too small: 4x4 is under the minimum side 6"),
            dead(items[6], "could not read the file: gone")]), label="DeadLetters")
        assert_that(results.shape | beam.Distinct(), equal_to(["8x8x3"]), label="Shapes")
        assert_that(results.sizes, _checked_by(sizes), label="Sizes")
        assert_that(results.moments, _checked_by(moments), label="Moments")


def test_channel_mean_std_combines_per_image_moments():
    images = [_pixels(seed).reshape(-1, 3).astype(np.int64) for seed in range(5)]
    moments = [(len(image), image.sum(0), (image ** 2).sum(0)) for image in images]
    pixels = np.concatenate(images).astype(np.float64)

    def statistics(outputs):
        (stats,) = outputs
        assert stats["pixels_per_channel"] == len(pixels)
        np.testing.assert_allclose(stats["mean"], pixels.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats["std"], pixels.std(0), rtol=1e-9)

    with _direct() as pipeline:
        assert_that(pipeline | "Moments" >> beam.Create(moments)
                    | "Stats" >> beam.CombineGlobally(ChannelMeanStd()),
                    _checked_by(statistics), label="Statistics")
        assert_that(pipeline | "NoTrainSplit" >> beam.Create([])
                    | "NoStats" >> beam.CombineGlobally(ChannelMeanStd()),
                    equal_to([None]), label="NoStatistics")


def test_write_shard_orders_its_examples_by_the_keyed_hash(tmp_path):
    examples = [(f"train/c/{index}", f"example {index}".encode()) for index in range(8)]
    ordered = sorted(examples, key=lambda pair: order_key(pair[0]))
    assert ordered != examples  # the order is not the ids' own
    data = b"".join(encode_record(example) for _, example in ordered)
    name = "train-00001-of-00003.tfrecord"
    with _direct() as pipeline:
        written = (pipeline | beam.Create([(("train", 1, 3), examples[::-1])])
                   | beam.ParDo(WriteShard(str(tmp_path))))
        assert_that(written, equal_to([{"split": "train", "num_examples": 8, "file": name,
                                        "size_bytes": len(data),
                                        "sha256": hashlib.sha256(data).hexdigest()}]))
    assert (tmp_path / name).read_bytes() == data
    assert [record.numpy() for record in tf.data.TFRecordDataset(str(tmp_path / name))] == [
        example for _, example in ordered]


def test_write_manifest_fills_empty_shards_and_writes_the_manifest_last(tmp_path):
    shard = tmp_path / "train-00000-of-00002.tfrecord"
    shard.write_bytes(b"ten bytes!")
    written = {"split": "train", "file": shard.name, "num_examples": 3, "size_bytes": 10,
               "sha256": hashlib.sha256(b"ten bytes!").hexdigest()}
    stats = {"mean": [1.0, 2.0, 3.0], "std": [0.5, 0.5, 0.5], "pixels_per_channel": 48}
    empty = {"file": "train-00001-of-00002.tfrecord", "num_examples": 0, "size_bytes": 0,
             "sha256": hashlib.sha256(b"").hexdigest()}
    expected = {
        "format_version": 1, "source": "folder:/images", "image_shape": [4, 4, 3],
        "class_names": ["a", "b"],
        "splits": {"train": {"num_examples": 3, "shards": [
            {key: written[key] for key in ("file", "num_examples", "size_bytes", "sha256")},
            empty]}},
        "train_statistics": stats, "num_inputs": 4,
        "dead_letters": {"count": 1, "files": [DEAD_LETTERS_NAME]}}

    def manifest(outputs):
        (only,) = outputs
        assert {key: value for key, value in only.items() if key != "created"} == expected
        assert only["created"].endswith("+00:00")

    with _direct() as pipeline:
        def side(label, values):
            return pipeline | label >> beam.Create(values)

        as_list, as_one = beam.pvalue.AsList, beam.pvalue.AsSingleton
        result = (pipeline | "Once" >> beam.Create([None]) | beam.ParDo(
            WriteManifest(str(tmp_path), source="folder:/images"),
            shards=as_list(side("Shards", [written])),
            shards_per_split=beam.pvalue.AsDict(side("Counts", [("train", 2)])),
            class_names=as_one(side("Classes", [["a", "b"]])),
            stats=as_one(side("Stats", [stats])),
            shapes=as_list(side("Shapes", ["4x4x3", "4x4x3"])),
            input_count=as_one(side("Inputs", [4])), dead_count=as_one(side("Dead", [1])),
            dead_files=as_list(side("DeadFiles", [str(tmp_path / DEAD_LETTERS_NAME)]))))
        assert_that(result, _checked_by(manifest))
    assert (tmp_path / empty["file"]).read_bytes() == b""
    text = (tmp_path / MANIFEST_NAME).read_text()
    on_disk = json.loads(text)
    assert text == json.dumps(on_disk, indent=2)
    assert {key: value for key, value in on_disk.items() if key != "created"} == expected
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(MANIFEST_NAME)] == [
        MANIFEST_NAME]  # the atomic writer's temporary file is gone
    assert load_manifest(str(tmp_path))["splits"] == expected["splits"]
