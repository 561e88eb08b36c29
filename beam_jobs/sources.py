"""Where raw images come from: a folder tree, a TFDS dataset, or bundled digits.

Each source is a ``PTransform`` from a pipeline root to items::

    {"id": str, "source_path": str, "split": str, "class_name": str,
     "data": bytes | None, "pixels": np.ndarray | None}

``data`` holds encoded file bytes (decoded and validated later, so that a
corrupt file becomes a dead letter); ``pixels`` holds an in-memory uint8
array (bundled digits).  ``class_names`` is the label vocabulary when the
source knows it up front, else ``None`` (the job derives it from the items).
"""

import hashlib
import os
import posixpath

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from beam_jobs.errors import InputError

KNOWN_SPLITS = ("train", "test", "validation", "val", "valid", "unlabeled", "unlabelled")
LAYOUTS = ("auto", "split/class", "class")


def hashed_split(key, test_fraction):
    """``"test"`` for a deterministic ``test_fraction`` of keys, else ``"train"``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2.0 ** 64 < test_fraction else "train"


def relative_path(path, root):
    """``path`` relative to ``root``, with ``/`` separators.  A listed file lies under its
    root: cutting the prefix is what relpath would return, at a fraction of its cost."""
    path, root = path.replace("\\", "/"), root.replace("\\", "/").rstrip("/")
    return path[len(root) + 1:] if path.startswith(root + "/") else posixpath.relpath(path, root)


def folder_item(path, root, data, test_fraction, layout="auto"):
    """An item for the file at ``path`` under ``root``, its split and class from the tree.

    ``layout``: ``split/class`` reads ``root/<split>/<class>/.../file``; ``class`` reads
    ``root/<class>/.../file`` with a hashed held-out split; ``auto`` takes the first form
    when the first folder is a known split name (train, test, validation, ...), else the
    second.  A file with no class folder is unlabelled.
    """
    relative = relative_path(path, root)
    parts = relative.split("/")
    by_split = layout == "split/class" or (layout == "auto" and len(parts) >= 3
                                            and parts[0] in KNOWN_SPLITS)
    if by_split and len(parts) >= 2:
        split, class_name = parts[0], parts[1] if len(parts) >= 3 else ""
    else:
        split = hashed_split(relative, test_fraction)
        class_name = parts[0] if len(parts) >= 2 else ""
    return {"id": relative, "source_path": path, "split": split, "class_name": class_name,
            "data": data, "pixels": None}


def read_file(path):
    """A file's bytes (any Beam filesystem), decompressed when its name says so (``.gz``,
    ``.bz2``, ...), as Beam's ``ReadMatches`` reads them."""
    with FileSystems.open(path, mime_type="application/octet-stream",
                          compression_type=CompressionTypes.AUTO) as handle:
        return handle.read()


def read_item(path, root, test_fraction, layout):
    """The item for the file at ``path``; a file that cannot be read (a broken link, no
    permission) becomes an item with ``unreadable`` set, which the job turns into a dead
    letter instead of failing or skipping it."""
    try:
        data, unreadable = read_file(path), None
    except OSError as error:  # IOError, which Beam's filesystems raise, is OSError
        data, unreadable = b"", f"could not read the file: {error}"
    item = folder_item(path, root, data, test_fraction, layout)
    if unreadable:
        item["unreadable"] = unreadable
    return item


def _folders_holding_folders(root):
    """The first-level folders of ``root`` with files two levels down (what ``root/*/*/*``
    matches: files, not deeper folders), from the same listing the job reads."""
    return sorted({parts[0] for parts in (relative_path(path, root).split("/")
                                          for path in files_under(root)) if len(parts) == 3})


def check_folder_layout(root, layout):
    """With ``auto``, refuses a tree whose first-level folders hold class folders but are not
    known split names (``training/cat/1.jpg``): they would silently become class names.
    Lists what it found and names the ``--layout`` to pass."""
    if layout != "auto":
        return
    root = root.rstrip("/")
    first_level = _folders_holding_folders(root)
    unknown = [name for name in first_level if name not in KNOWN_SPLITS]
    if unknown:
        raise InputError(
            f"--source folder:{root}: the folders {unknown[:10]} hold sub-folders but are not "
            f"split names ({', '.join(KNOWN_SPLITS)}), so the layout is ambiguous. Pass "
            f"--layout split/class if they are splits (PATH/<split>/<class>/<file>) or "
            f"--layout class if they are classes (PATH/<class>/.../<file>)")


class _ClassesOfPaths(beam.DoFn):
    """The distinct class folders of a bundle's matched paths, once per bundle (a handful of
    elements through the runner instead of one per file)."""

    def __init__(self, root, test_fraction, layout):
        self.root, self.test_fraction, self.layout = root, test_fraction, layout

    def start_bundle(self):
        self._names = set()

    def process(self, path):
        self._names.add(folder_item(path, self.root, None, self.test_fraction,
                                    self.layout)["class_name"])

    def finish_bundle(self):
        for name in sorted(self._names - {""}):  # "" is unlabelled
            yield GlobalWindows.windowed_value(name)


def files_under(root):
    """Every file under ``root``, recursively: what matching ``root/**`` finds.  A local tree
    is walked (Beam's local match stats every file for a size and time nobody reads here:
    about half a second on CIFAR-10); other filesystems are matched."""
    if "://" not in root and os.path.isdir(root):
        for folder, _, names in os.walk(root):
            for name in names:
                yield os.path.join(folder, name)
        return
    for metadata in FileSystems.match([f"{root}/**"])[0].metadata_list:
        if not metadata.path.endswith(("/", "\\")):
            yield metadata.path


class ReadFolder(beam.PTransform):
    """Every file under ``root`` (any Beam filesystem: local, gs://, ...).  Its class names,
    the sorted class folders, are ``class_names_pcoll`` once the transform is applied."""

    class_names = None
    class_names_pcoll = None

    def __init__(self, root, *, test_fraction, layout="auto"):
        super().__init__()
        self.root = root.rstrip("/")
        self.test_fraction, self.layout = test_fraction, layout
        check_folder_layout(self.root, layout)

    def expand(self, pipeline):
        root, fraction, layout = self.root, self.test_fraction, self.layout
        matched = (pipeline
                   | "Root" >> beam.Create([root])
                   | "MatchFiles" >> beam.FlatMap(files_under))
        # The label vocabulary comes from the paths alone, so that reading and converting the
        # images (which need it as a side input) run as one fused stage instead of the runner
        # holding every file's bytes until a pass over the items has found the classes.
        self.class_names_pcoll = (
            matched
            | "ClassesOfPaths" >> beam.ParDo(_ClassesOfPaths(root, fraction, layout))
            | "Distinct" >> beam.Distinct()
            | "AllClasses" >> beam.combiners.ToList()
            | "Sort" >> beam.Map(sorted))
        # One step reads each file and makes its item (fileio.ReadMatches would add a step
        # per file, and guess a decompression from the file name).
        return matched | "ReadFiles" >> beam.Map(read_item, root, fraction, layout)


def digit_images():
    """scikit-learn's bundled 8x8 digits as RGB uint8 ``[1797, 8, 8, 3]`` and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1), digits.target.astype(np.int64)


class ReadDigits(beam.PTransform):
    """The 1,797 real handwritten digits that ship with scikit-learn (no network)."""

    class_names = [str(digit) for digit in range(10)]

    def __init__(self, *, test_fraction):
        super().__init__()
        self.test_fraction = test_fraction

    def expand(self, pipeline):
        images, labels = digit_images()
        items = []
        for index, (pixels, label) in enumerate(zip(images, labels)):
            item_id = f"digits/{index:04d}"
            items.append({"id": item_id, "source_path": f"sklearn.datasets.load_digits[{index}]",
                          "split": hashed_split(item_id, self.test_fraction),
                          "class_name": str(label), "data": None, "pixels": pixels})
        return pipeline | "CreateDigits" >> beam.Create(items, reshuffle=False)


class _ReadTfdsSlice(beam.DoFn):
    """Reads one even slice of a TFDS split, keeping the encoded image bytes."""

    def __init__(self, name, data_dir, image_key, label_key, class_names):
        self.name, self.data_dir = name, data_dir
        self.image_key, self.label_key, self.class_names = image_key, label_key, class_names

    def setup(self):
        import tensorflow_datasets as tfds

        self._tfds = tfds
        self._builder = tfds.builder(self.name, data_dir=self.data_dir)

    def process(self, element):
        split, index, count = element
        tfds = self._tfds
        sub_split = tfds.even_splits(split, count)[index]
        dataset = self._builder.as_dataset(
            split=sub_split, shuffle_files=False,
            decoders={self.image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(add_tfds_id=True))
        for position, example in enumerate(tfds.as_numpy(dataset)):
            tfds_id = example.get("tfds_id", b"")
            tfds_id = tfds_id.decode() if tfds_id else f"{split}-{index}-{position}"
            image = example[self.image_key]
            label = int(example[self.label_key]) if self.label_key else -1
            yield {"id": f"tfds/{self.name}/{tfds_id}",
                   "source_path": f"tfds:{self.name}/{tfds_id}", "split": split,
                   "class_name": self.class_names[label] if label >= 0 else "",
                   "data": image if isinstance(image, bytes) else None,
                   "pixels": None if isinstance(image, bytes) else np.asarray(image)}


class ReadTfds(beam.PTransform):
    """A TFDS image dataset (``tfds:NAME`` or ``tfds:NAME:SPLIT,SPLIT``).

    Downloads and prepares the dataset on the launching machine when it is
    not yet in ``data_dir`` (needs network); then reads each split in
    ``slices`` even slices in parallel.
    """

    def __init__(self, spec, *, data_dir=None, slices=8):
        super().__init__()
        import tensorflow_datasets as tfds

        name, _, splits = spec.partition(":")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError as error:
            raise InputError(f"--source tfds:{name}: {error}") from error
        builder.download_and_prepare()
        features = builder.info.features
        image_keys = [key for key, feature in features.items()
                      if isinstance(feature, tfds.features.Image)]
        if not image_keys:
            raise InputError(f"--source tfds:{name}: the dataset has no image feature "
                             f"(features: {sorted(features)})")
        label_keys = [key for key, feature in features.items()
                      if isinstance(feature, tfds.features.ClassLabel)]
        self.name, self.data_dir, self.slices = name, data_dir, slices
        self.image_key = image_keys[0]
        self.label_key = ("label" if "label" in label_keys
                          else (label_keys[0] if label_keys else None))
        self.class_names = list(features[self.label_key].names) if self.label_key else []
        available = list(builder.info.splits.keys())
        self.splits = splits.split(",") if splits else available
        if not self.splits:
            raise InputError(f"--source tfds:{spec}: the dataset records no splits; name them, "
                             f"e.g. tfds:{name}:train,test")
        unknown = [split for split in self.splits if available and split not in available]
        if unknown:
            raise InputError(f"--source tfds:{spec}: unknown split(s) {unknown}; "
                             f"the dataset has {available}")

    def expand(self, pipeline):
        slices = [(split, index, self.slices) for split in self.splits
                  for index in range(self.slices)]
        return (pipeline
                | "CreateSlices" >> beam.Create(slices)
                | "ReadSlices" >> beam.ParDo(_ReadTfdsSlice(
                    self.name, self.data_dir, self.image_key, self.label_key, self.class_names)))


def source_transform(spec, *, test_fraction, tfds_data_dir=None, tfds_slices=8, layout="auto"):
    """The source ``PTransform`` for a ``--source`` value."""
    if layout not in LAYOUTS:
        raise InputError(f"--layout must be one of {list(LAYOUTS)}, received {layout!r}")
    if spec == "digits":
        return ReadDigits(test_fraction=test_fraction)
    if spec.startswith("folder:") and len(spec) > len("folder:"):
        return ReadFolder(spec[len("folder:"):], test_fraction=test_fraction, layout=layout)
    if spec.startswith("tfds:") and len(spec) > len("tfds:"):
        return ReadTfds(spec[len("tfds:"):], data_dir=tfds_data_dir, slices=tfds_slices)
    raise InputError(f"--source must be 'digits', 'folder:PATH' or 'tfds:NAME[:SPLIT,...]', "
                     f"received {spec!r}")
