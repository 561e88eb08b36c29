"""The similar-image gallery: embeddings of known images that an export searches.

A gallery is read from an output folder of ``ascl embed`` (its TFRecords, or
its Parquet files when it holds no TFRecords) and its ``embed_info.json``,
which says which weights made the embeddings.  ``ascl export --gallery`` puts
it inside the SavedModel as variables (``GalleryIndex``), never as graph
constants: a GraphDef is capped at 2 GiB, variables are not.

The search is exact brute force, a ``matmul`` and a ``top_k``: both are core
TensorFlow ops, so stock TF Serving runs the export as it is.  (keras-rs's
``BruteForceRetrieval`` is the same two ops, but its candidate ids are
``int32`` only, and a gallery needs string ids, labels and paths beside the
scores; a dependency for two ops is not worth it.)  ``top_k`` puts the lower
index first among equal scores, and the gallery is stored in id order, so ties
are broken by gallery order, the same way ``brute_force_search`` (the NumPy
reference) breaks them.
"""

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from beam_jobs.embed_output import EMBED_INFO_NAME, PARQUET_PATTERN, TFRECORD_PATTERN
from beam_jobs.errors import InputError

STORAGE_DTYPES = ("float32", "bfloat16")


class GalleryError(InputError):
    """A gallery that cannot be searched with the model being exported; the message says why."""


@dataclasses.dataclass
class Gallery:
    """Unit-norm ``embeddings [N, F]`` and, per row, ``ids``, ``labels`` (-1: unknown) and
    ``paths`` (``""`` where the embed output had none); ``info`` is the embed folder's
    ``embed_info.json`` (which weights made it)."""

    embeddings: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    info: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.ids)


def brute_force_search(queries, embeddings, k):
    """NumPy reference of the exported search: ``(indices [B, k], scores [B, k])`` by cosine
    similarity, descending, ties broken by gallery order (the lower index first)."""
    queries = np.asarray(queries, np.float32)
    queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    scores = queries @ np.asarray(embeddings, np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def _tfrecord_rows(files):
    spec = {"id": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64),
            "embedding": tf.io.VarLenFeature(tf.float32),
            "source_path": tf.io.FixedLenFeature([], tf.string, default_value="")}
    ids, labels, paths, rows = [], [], [], []
    batches = (tf.data.TFRecordDataset(files).batch(4096)
               .map(lambda records: tf.io.parse_example(records, spec)))
    for batch in batches:
        ids.append(batch["id"].numpy())
        labels.append(batch["label"].numpy())
        paths.append(batch["source_path"].numpy())
        dense = tf.sparse.to_dense(batch["embedding"]).numpy()
        widths = tf.math.bincount(tf.cast(batch["embedding"].indices[:, 0], tf.int32),
                                  minlength=len(dense)).numpy()
        if len(set(widths.tolist())) > 1:
            raise GalleryError(f"the embeddings in {files[0]}... do not all have the same width "
                               f"({sorted(set(widths.tolist()))})")
        rows.append(dense)
    return ids, labels, paths, rows


def _parquet_rows(files):
    import pyarrow.parquet as pq

    ids, labels, paths, rows = [], [], [], []
    for path in files:
        table = pq.read_table(path)
        ids.append(np.array([i.encode() for i in table.column("id").to_pylist()], object))
        labels.append(np.array(table.column("label").to_pylist(), np.int64))
        column = (table.column("source_path").to_pylist() if "source_path" in table.column_names
                  else [""] * table.num_rows)
        paths.append(np.array([p.encode() for p in column], object))
        vectors = table.column("embedding").to_pylist()
        if len({len(v) for v in vectors}) > 1:
            raise GalleryError(f"the embeddings in {path} do not all have the same width")
        rows.append(np.array(vectors, np.float32).reshape(len(vectors), -1))
    return ids, labels, paths, rows


def read_gallery(folder):
    """The ``Gallery`` in an ``ascl embed`` output folder, in id order.

    Refuses a folder without ``embed_info.json`` (an unfinished embed job, or
    one made before embed outputs recorded their weights), an empty one, one
    whose ids repeat, and rows that are not finite or are all zero.
    """
    info_path = f"{folder.rstrip('/')}/{EMBED_INFO_NAME}"
    if not tf.io.gfile.isdir(folder):
        raise GalleryError(f"--gallery {folder} is not a folder (pass the --output folder of "
                           f"`ascl embed`)")
    if not tf.io.gfile.exists(info_path):
        raise GalleryError(f"--gallery {folder} has no {EMBED_INFO_NAME}: it is not a finished "
                           f"output of `ascl embed` (the job writes that file last, naming the "
                           f"weights that made the embeddings); run `ascl embed` again")
    with tf.io.gfile.GFile(info_path) as handle:
        info = json.load(handle)
    tfrecords = sorted(tf.io.gfile.glob(f"{folder.rstrip('/')}/{TFRECORD_PATTERN}"))
    parquet = sorted(tf.io.gfile.glob(f"{folder.rstrip('/')}/{PARQUET_PATTERN}"))
    if tfrecords:
        parts = _tfrecord_rows(tfrecords)
    elif parquet:
        parts = _parquet_rows(parquet)
    else:
        raise GalleryError(f"--gallery {folder} holds no embeddings-*.tfrecord or "
                           f"embeddings-*.parquet files")
    if not sum(len(batch) for batch in parts[0]):
        raise GalleryError(f"--gallery {folder} is empty: its embed job wrote no embeddings")
    if len({batch.shape[-1] for batch in parts[3]}) > 1:
        raise GalleryError(f"the embeddings in {folder} do not all have the same width")
    ids, labels, paths, rows = (np.concatenate(part) for part in parts)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        repeated = [i.decode() for i in unique[counts > 1][:5]]
        raise GalleryError(f"--gallery {folder} has {int((counts > 1).sum())} duplicate ids "
                           f"(e.g. {', '.join(repeated)}): every gallery image needs its own id; "
                           f"embed one dataset per gallery")
    order = np.argsort(ids, kind="stable")
    return Gallery(normalized(rows[order], folder), ids[order].astype(object),
                   labels[order].astype(np.int64), paths[order].astype(object), info)


def normalized(embeddings, where="the gallery"):
    """Rows scaled to unit L2 norm; non-finite or all-zero rows are refused."""
    embeddings = np.asarray(embeddings, np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise GalleryError(f"{where} has {int(bad.sum())} embeddings that are all zero or not "
                           f"finite (row {int(np.flatnonzero(bad)[0])} first)")
    return embeddings / norms


def check_gallery(gallery, *, feature_dim, k, weights_sha256):
    """Refuses a gallery the model being exported cannot search, naming what differs."""
    width = gallery.embeddings.shape[1]
    if width != feature_dim:
        raise GalleryError(f"the gallery's embeddings are {width}-d but the model's embeddings "
                           f"are {feature_dim}-d: embed the gallery with an export of this run")
    if not 1 <= k <= len(gallery):
        raise GalleryError(f"--k {k} must be between 1 and the gallery's size ({len(gallery)})")
    made_by = gallery.info.get("weights_sha256")
    if made_by is None:
        raise GalleryError("the gallery's embed_info.json does not record the weights that made "
                           "it (it was embedded with an export made before exports recorded "
                           "them): export the run again, embed with that export, then export "
                           "with --gallery")
    if made_by != weights_sha256:
        source = gallery.info.get("model") or "another export"
        raise GalleryError(
            f"the gallery was embedded by other weights ({source}, weights sha256 "
            f"{made_by[:12]}...) than the ones being exported ({weights_sha256[:12]}...): "
            f"its neighbours would be meaningless; embed the gallery with an export of this "
            f"run and checkpoint")


class GalleryIndex(tf.Module):
    """The gallery as SavedModel variables, and the exact search over it.

    ``search(queries)`` takes unit-norm ``float32 [B, F]`` rows and returns
    ``ids``/``labels``/``paths`` ``[B, k]`` and ``scores`` ``float32 [B, k]``
    (cosine similarity, descending).  With ``storage="bfloat16"`` the gallery
    is stored, and first searched, in bfloat16 (half the memory and
    bandwidth), then its shortlist is ranked in float32: approximate, with the
    recall measured in BENCHMARKS.md.
    """

    def __init__(self, gallery, k, storage="float32"):
        super().__init__(name="gallery")
        if storage not in STORAGE_DTYPES:
            raise GalleryError(f"--gallery-dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                               f"received {storage!r}")
        self.k, self.storage = int(k), storage
        self.candidates = min(len(gallery), max(8 * self.k, 128))
        self.embeddings = tf.Variable(tf.cast(gallery.embeddings, storage), trainable=False,
                                      name="embeddings")
        self.ids = tf.Variable(gallery.ids.tolist(), dtype=tf.string, trainable=False, name="ids")
        self.labels = tf.Variable(gallery.labels, dtype=tf.int64, trainable=False, name="labels")
        self.paths = tf.Variable(gallery.paths.tolist(), dtype=tf.string, trainable=False,
                                 name="paths")

    @property
    def variables_to_save(self):
        return [self.embeddings, self.ids, self.labels, self.paths]

    def search(self, queries):
        queries = tf.cast(queries, tf.float32)
        if self.storage == "float32":
            scores = tf.matmul(queries, self.embeddings, transpose_b=True)
            top = tf.math.top_k(scores, k=self.k, sorted=True)
            indices, values = top.indices, top.values
        else:
            indices, values = self._bfloat16_search(queries)
        return {"ids": tf.gather(self.ids, indices), "scores": values,
                "labels": tf.gather(self.labels, indices),
                "paths": tf.gather(self.paths, indices)}

    def _bfloat16_search(self, queries):
        """A bfloat16 product rounds every score to 8 bits of mantissa (steps of 1/256 near a
        cosine of 1), too coarse to rank close neighbours.  So it only shortlists
        ``candidates`` rows; those are scored again in float32 (from their bfloat16-stored
        values) and the best ``k`` of them are returned."""
        coarse = tf.matmul(tf.cast(queries, tf.bfloat16), self.embeddings, transpose_b=True)
        shortlist = tf.math.top_k(tf.cast(coarse, tf.float32), k=self.candidates).indices
        rows = tf.cast(tf.gather(self.embeddings, shortlist), tf.float32)  # [B, C, F]
        exact = tf.einsum("bf,bcf->bc", queries, rows)
        best = tf.math.top_k(exact, k=self.k, sorted=True)
        return tf.gather(shortlist, best.indices, batch_dims=1), best.values


def gallery_description(gallery, folder, k, storage):
    """What the export's ``ascl_export.json`` says about its gallery."""
    return {"source": os.path.abspath(folder) if "://" not in folder else folder,
            "size": len(gallery), "embedding_dim": int(gallery.embeddings.shape[1]), "k": int(k),
            "storage": storage, "labelled": int((gallery.labels >= 0).sum()),
            "with_paths": int(sum(1 for p in gallery.paths if p)),
            "embedded_by": {key: gallery.info.get(key) for key in
                            ("model", "run_dir", "checkpoint", "weights_sha256")}}
