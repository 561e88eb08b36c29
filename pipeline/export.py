"""``ascl export``: a trained run's encoder as a SavedModel that TF Serving loads as it is.

Writes ``saved_models/NAME/VERSION/`` (the layout TF Serving polls) with two
signatures, built with Keras 3's ``keras.export.ExportArchive``, computing in
float32 or, with ``--precision bfloat16``, in bfloat16 (outputs float32 either way):

* ``serving_default``: ``image_bytes`` (``tf.string [None]``, JPEG/PNG/BMP/WebP
  bytes; the ``_bytes`` suffix lets the REST API take ``{"b64": ...}``; an image
  over ``max_pixels`` by its header is refused before decoding,
  ``pipeline.image_guard``) ->
  ``embedding`` (``float32 [None, F]``, L2-normalised backbone features) and
  ``projection`` (``float32 [None, D]``, L2-normalised projector output).
  Decoding, resizing (``beam_jobs.dataset_format.square_crop_and_resize``: the
  largest centred square, resized, exactly as the preparation job does it) and
  normalisation with the dataset's mean and std run in the graph.
* ``embed_pixels``: ``images`` (``uint8 [None, H, W, 3]``) -> the same outputs.

With a gallery (``ascl export --gallery EMBED_OUTPUT``, ``pipeline.gallery``)
two more, for similar-image search inside TF Serving:

* ``neighbors``: ``image_bytes`` -> ``ids`` (``string [None, k]``), ``scores``
  (``float32 [None, k]``, cosine similarity, descending), ``labels``
  (``int64 [None, k]``, -1 where unknown) and ``paths`` (``string [None, k]``);
* ``neighbors_of_embedding``: ``embedding`` (``float32 [None, F]``, normalised
  in the graph) -> the same outputs.

The gallery is stored as variables of the version (``gallery/*``), so a new
gallery is a new version.

Only the query-side backbone and projector are exported, not the training
model with its queue and key encoder.  The export is written to a temporary
folder and renamed into place, so a server watching the folder never sees a
half-written version, and an existing version is never overwritten.  Warm-up
requests (``assets.extra/tf_serving_warmup_requests``), a description of the
expected input (``assets.extra/ascl_export.json``) and the server's
``models.config`` are written too.
"""

import hashlib
import os
import re
import shutil
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from beam_jobs.atomic_json import write_json
from beam_jobs.dataset_format import square_crop_and_resize
from beam_jobs.errors import InputError, OutputExists
from models.batch_norm_folding import NotFunctional, fold_batch_norm
from models.keras_workarounds import untracked_export_archive
from pipeline.data import channel_statistics
from pipeline.gallery import GalleryIndex, check_gallery, gallery_description, read_gallery
from pipeline.image_guard import DEFAULT_MAX_PIXELS, MAX_PIXELS_LIMIT, guarded_decode
from pipeline.run_dir import RunDir, build_model, load_trained_model

EXPORT_PRECISIONS = {"float32": "float32", "bfloat16": "bfloat16"}  # -> Keras dtype policy
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
INFO_FILE = os.path.join("assets.extra", "ascl_export.json")


def _next_version(model_dir):
    versions = [int(name) for name in os.listdir(model_dir) if name.isdigit()] if os.path.isdir(
        model_dir) else []
    return max(versions, default=0) + 1


def _preprocess_bytes(image_bytes, size, max_pixels=DEFAULT_MAX_PIXELS):
    """Decodes one image (refusing it first if its header says it is over ``max_pixels``)
    and brings it to the training size with the preparation's policy."""
    return square_crop_and_resize(guarded_decode(image_bytes, max_pixels), size)


def weights_sha256(*layers):
    """A digest of the exported weights (each variable's path, shape, dtype and values, in
    order): recorded in the export, copied into every embed output made with it, and
    compared when an embed output becomes a gallery."""
    digest = hashlib.sha256()
    for layer in layers:
        for variable in layer.weights:
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value))
            digest.update(f"{variable.path}|{value.shape}|{value.dtype}|".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


def build_export_archive(backbone, projector, manifest, gallery=None,
                         max_pixels=DEFAULT_MAX_PIXELS):
    """An ``ExportArchive`` with the ``serving_default`` and ``embed_pixels`` endpoints, and
    ``neighbors`` and ``neighbors_of_embedding`` when a ``GalleryIndex`` is given."""
    height, width, _ = manifest["image_shape"]
    mean, std = (tf.constant(value) for value in channel_statistics(manifest))
    constant_kernels = compute_precision(backbone) == "bfloat16"
    encode = _encoder(backbone, projector, (height, width, 3), constant_kernels)

    def outputs(images):
        features, projection = encode((tf.cast(images, tf.float32) - mean) / std)
        return {"embedding": tf.math.l2_normalize(features, axis=1),
                "projection": tf.math.l2_normalize(projection, axis=1)}

    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda b: _preprocess_bytes(b, height, max_pixels), image_bytes,
                           fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8))
        return outputs(images)

    def serve_pixels(images):
        # The signature declares [None, H, W, 3], but a loaded SavedModel (and TF Serving)
        # may still be fed another shape. Its static shape is the declared one, so rank and
        # dims checks would be folded away; the element count is only known at run time.
        well_formed = tf.equal(tf.size(images), tf.shape(images)[0] * height * width * 3)
        check = tf.debugging.Assert(well_formed, [
            f"embed_pixels expects uint8 images of shape [batch, {height}, {width}, 3]; "
            "received", tf.size(images), "values for a batch of", tf.shape(images)[0]])
        with tf.control_dependencies([check]):
            return outputs(tf.identity(images))

    # The layers are not tracked (keras-team/keras#23553): the archive saves the variables
    # the endpoints read, each once, so a bfloat16 export's kernels, which its graph holds
    # as constants, are not saved again as unused variables either.
    archive = untracked_export_archive()
    archive.add_endpoint("serving_default", serve_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("embed_pixels", serve_pixels,
                         input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8,
                                                        name="images")])
    if gallery is not None:
        _add_neighbor_endpoints(archive, gallery, serve_bytes, backbone.feature_dim)
    return archive


def _encoder(backbone, projector, image_shape, constant_kernels):
    """``images [B, H, W, 3] float32 -> (features, projection)``, both float32.

    ``constant_kernels`` (a bfloat16 export): the convolution and dense kernels become
    constants of the graph, read through ``keras.StatelessScope``; every other weight stays
    a variable.  oneDNN's bfloat16 convolutions want the filters in a blocked layout, and
    TF's oneDNN convolution keeps a reordered filter only for a constant one: with
    variables, every request reorders every filter again, which made a batch-1 bfloat16
    ResNet-18 request slower than float32.  The biases stay variables because grappler's
    constant folding, given a constant bias too, stops the remapper from fusing
    convolution, bias and ReLU into one oneDNN primitive (measured: 17 of ResNet-18's 20
    convolutions fused this way, none with every weight constant; BENCHMARKS.md).  The
    encoder is one function, so the kernels are stored once whichever signatures call it,
    and ``build_export_archive`` saves only the variables the graph reads; a ResNet-18 is
    22 MB of bfloat16 constants, far from the GraphDef's 2 GiB cap."""
    def encode(images):
        features = tf.cast(backbone(images, training=False), tf.float32)
        return features, tf.cast(projector(features, training=False), tf.float32)

    if not constant_kernels:
        return encode
    kernels = [(variable, keras.ops.convert_to_numpy(variable.value))
               for variable in _kernel_variables(backbone, projector)]

    @tf.function(input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)],
                 autograph=False)
    def encode_with_constant_kernels(images):
        mapping = [(variable, tf.constant(value, dtype=variable.dtype))
                   for variable, value in kernels]
        with keras.StatelessScope(state_mapping=mapping):
            return encode(images)

    return encode_with_constant_kernels


def _kernel_variables(*models):
    """The kernel variables (``kernel``, ``depthwise_kernel``, ``pointwise_kernel``) of every
    layer of ``models``, nested layers included, each once.  Keras has no public walk over
    nested layers: ``_flatten_layers`` is the one ``layer.weights`` itself uses."""
    found = {}
    for model in models:
        for layer in model._flatten_layers(include_self=False):
            for name in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                variable = getattr(layer, name, None)
                if isinstance(variable, keras.Variable):
                    found.setdefault(id(variable), variable)
    return list(found.values())


def _add_neighbor_endpoints(archive, gallery, serve_bytes, feature_dim):
    def neighbors(image_bytes):
        return gallery.search(serve_bytes(image_bytes)["embedding"])

    def neighbors_of_embedding(embedding):
        # As in embed_pixels: a loaded SavedModel may be fed another width, and only the
        # element count is known at run time.
        well_formed = tf.equal(tf.size(embedding), tf.shape(embedding)[0] * feature_dim)
        check = tf.debugging.Assert(well_formed, [
            f"neighbors_of_embedding expects float32 embeddings of shape [batch, {feature_dim}]; "
            "received", tf.size(embedding), "values for a batch of", tf.shape(embedding)[0]])
        with tf.control_dependencies([check]):
            norms = tf.norm(embedding, axis=1)
        # a zero or non-finite query has no direction: refused, never answered arbitrarily
        usable = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(norms) & (norms > 0)), [
            "neighbors_of_embedding: every embedding must be finite and not all zero"])
        with tf.control_dependencies([usable]):
            return gallery.search(tf.math.l2_normalize(tf.identity(embedding), axis=1))

    archive.add_variable_collection("gallery", gallery.variables_to_save)
    archive.add_endpoint("neighbors", neighbors,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    archive.add_endpoint("neighbors_of_embedding", neighbors_of_embedding,
                         input_signature=[tf.TensorSpec([None, feature_dim], tf.float32,
                                                        name="embedding")])


def write_warmup_requests(export_dir, manifest, count=3):
    """A few ``PredictionLog`` records on ``serving_default`` (PNG images of the right size)."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    height, width, _ = manifest["image_shape"]
    rng = np.random.default_rng(0)
    images = [tf.io.encode_png(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).numpy()
              for _ in range(count)]
    path = os.path.join(export_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for batch in (images[:1], images):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(signature_name="serving_default"))
            request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(batch, dtype=tf.string))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return path


def write_models_config(base_dir):
    """``base_dir/models.config`` listing every exported model (TF Serving's
    --model_config_file)."""
    names = sorted(name for name in os.listdir(base_dir)
                   if os.path.isdir(os.path.join(base_dir, name)) and re.fullmatch(r"[\w.-]+", name)
                   and any(v.isdigit() for v in os.listdir(os.path.join(base_dir, name))))
    lines = ["model_config_list {"]
    for name in names:
        lines += ["  config {", f'    name: "{name}"',
                  f'    base_path: "{os.path.abspath(os.path.join(base_dir, name))}"',
                  '    model_platform: "tensorflow"', "  }"]
    lines.append("}")
    path = os.path.join(base_dir, "models.config")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _check_precision(precision):
    if precision not in EXPORT_PRECISIONS:
        raise InputError(f"--precision must be one of {list(EXPORT_PRECISIONS)}, received "
                         f"{precision!r}")


def load_for_export(run_dir, checkpoint="last", precision="float32"):
    """``(backbone, projector, manifest, weights_sha256)`` of a run, the layers computing in
    ``precision`` (``in_precision``).  The digest is of the float32 weights either way, so a
    gallery embedded by the float32 export is accepted.  The caller's global policy is
    restored."""
    _check_precision(precision)
    previous = keras.mixed_precision.global_policy()
    try:  # whatever policy the caller has set, float32 means float32
        keras.mixed_precision.set_global_policy("float32")
        model, config, manifest = load_trained_model(run_dir, checkpoint)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    backbone, projector = in_precision(model.backbone, model.projector, precision,
                                       rebuild=lambda: build_model(config, manifest))
    return backbone, projector, manifest, weights_sha256(model.backbone, model.projector)


def in_precision(backbone, projector, precision, rebuild=None):
    """``(backbone, projector)`` computing in ``precision``, from float32 ones.

    ``float32``: the same layers.  ``bfloat16``: clones under Keras's ``bfloat16`` policy
    (variables and compute in bfloat16), each batch norm that follows a convolution or dense
    layer folded into it (``models.batch_norm_folding``; Keras's batch norm would normalise
    in float32 between two casts), the weights cast once: measured faster than
    ``mixed_bfloat16``, whose float32 variables are cast on every request, and folding made
    the batch-1 request faster again (BENCHMARKS.md).  A model that is not functional
    cannot be cloned: ``rebuild()`` (the same architecture, built under the current policy)
    is called then, and the weights copied into it unfolded.  The caller's global policy is
    restored."""
    _check_precision(precision)
    if precision == "float32":
        return backbone, projector
    dtype = EXPORT_PRECISIONS[precision]
    try:  # fold_batch_norm sets the policy of what it builds itself
        folded_backbone, _ = fold_batch_norm(backbone, dtype)
        folded_projector, _ = fold_batch_norm(projector, dtype)
        folded_backbone.feature_dim = backbone.feature_dim
        return folded_backbone, folded_projector
    except NotFunctional as error:
        if rebuild is None:
            raise
        warnings.warn(f"{error}: exported in {precision} with batch norm unfolded (slower)",
                      stacklevel=2)
    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy(dtype)
        converted = rebuild()
    finally:
        keras.mixed_precision.set_global_policy(previous)
    for target, source in ((converted.backbone, backbone), (converted.projector, projector)):
        target.set_weights([np.asarray(w, np.float32) for w in source.get_weights()])
    return converted.backbone, converted.projector


def compute_precision(layer):
    """``float32`` or ``bfloat16``: what ``layer`` computes in (its dtype policy)."""
    return "bfloat16" if layer.dtype_policy.compute_dtype == "bfloat16" else "float32"


def write_export(backbone, projector, manifest, final, *, provenance=None, gallery=None,
                 gallery_info=None, max_pixels=DEFAULT_MAX_PIXELS, digest=None):
    """Writes the SavedModel for ``backbone`` + ``projector`` (and a ``GalleryIndex``) at
    ``final``, atomically.  ``digest``: their ``weights_sha256``, when the caller has it.
    The precision recorded is the backbone's compute dtype (``load_for_export``)."""
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    signatures = ["serving_default", "embed_pixels"]
    if gallery is not None:
        signatures += ["neighbors", "neighbors_of_embedding"]
    try:
        build_export_archive(backbone, projector, manifest, gallery,
                             max_pixels).write_out(staging, verbose=False)
        write_warmup_requests(staging, manifest)
        write_json(os.path.join(staging, INFO_FILE), {
            "image_shape": manifest["image_shape"],
            "class_names": manifest["class_names"],
            "train_statistics": manifest["train_statistics"],
            "signatures": signatures,
            "embedding_dim": int(backbone.feature_dim),
            "precision": compute_precision(backbone),
            "max_pixels": int(max_pixels),
            "weights_sha256": digest or weights_sha256(backbone, projector),
            **({"gallery": gallery_info} if gallery_info else {}),
            **(provenance or {})}, indent=2)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def export_run(run_dir, *, name, checkpoint="last", version=None, base_dir="saved_models",
               gallery=None, k=10, gallery_dtype="float32", max_pixels=DEFAULT_MAX_PIXELS,
               precision="float32"):
    """Exports a run's encoder to ``base_dir/name/version``; returns that path.

    ``gallery``: an ``ascl embed`` output folder made with an export of the same
    weights (of either precision); the export then also answers ``neighbors`` (top ``k``).
    ``precision``: ``float32`` or ``bfloat16``, what the backbone and projector compute in
    (``load_for_export``); outputs are float32 and unit-norm either way."""
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
        raise InputError(f"--name must be letters, digits, '.', '_' or '-', received {name!r}")
    if version is not None and version < 1:
        raise InputError(f"--version must be >= 1, received {version}")
    if not 1 <= max_pixels <= MAX_PIXELS_LIMIT:
        raise InputError(f"--max-pixels must be between 1 and {MAX_PIXELS_LIMIT}, received "
                         f"{max_pixels}")
    backbone, projector, manifest, digest = load_for_export(run_dir, checkpoint, precision)
    index = gallery_info = None
    if gallery is not None:
        contents = read_gallery(gallery)
        check_gallery(contents, feature_dim=int(backbone.feature_dim), k=k,
                      weights_sha256=digest)
        index = GalleryIndex(contents, k, gallery_dtype)
        gallery_info = gallery_description(contents, gallery, k, gallery_dtype)
    model_dir = os.path.join(base_dir, name)
    if version is None:
        version = _next_version(model_dir)
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise OutputExists(f"{final} already exists; versions are never overwritten "
                              f"(omit --version to take the next one)")
    write_export(backbone, projector, manifest, final, gallery=index,
                 gallery_info=gallery_info, max_pixels=max_pixels, digest=digest,
                 provenance={"run_dir": os.path.abspath(run_dir),
                             "checkpoint": RunDir(run_dir).checkpoint_info(checkpoint)})
    write_models_config(base_dir)
    return final
