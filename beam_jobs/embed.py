"""Beam job: embed a whole dataset with an exported SavedModel through RunInference.

    ascl embed --model saved_models/ascl_digits/1 --input .data/digits16 --split test \\
        --output /tmp/embeddings [--parquet] [--projector-samples 500]

Input is a prepared dataset (its shards, ``--split``) or ``folder:PATH`` of
image files (decoded, validated and resized like the preparation job;
rejects go to ``dead_letters-*.jsonl``).  Images go through
``apache_beam.ml.inference.RunInference`` with Beam's TensorFlow model
handler, calling the export's ``embed_pixels`` signature on batches.  Writes
``embeddings-*.tfrecord`` (``tf.train.Example`` with ``id``, ``label``,
``class_name``, ``source_path``, ``embedding``), optionally
``embeddings-*.parquet``, a TensorBoard projector folder for a sample, and,
last, ``embed_info.json``: which export (and so which run, checkpoint and
weights digest) made the embeddings, so that ``ascl export --gallery`` can
refuse embeddings of other weights.  Other flags are Beam ``PipelineOptions``.
"""

import argparse
import hashlib
import json
import logging
import os
import sys

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_jobs.atomic_json import write_json
from beam_jobs.dataset_format import load_manifest, parse_example, shard_file_glob
from beam_jobs.embed_output import EMBED_INFO_NAME, EMBEDDINGS_PREFIX
from beam_jobs.errors import InputError, MissingInput, OutputExists
from beam_jobs.images import InvalidImage, decode_image, square_and_resize, validate_pixels
from beam_jobs.sources import ReadFolder

EXPORT_INFO = "assets.extra/ascl_export.json"


def embed_pixels_inference(model, batch, inference_args=None, model_id=None):
    """RunInference ``inference_fn``: the export's ``embed_pixels`` signature on a batch."""
    import tensorflow as tf

    # Elements can lose their uint8 dtype crossing Beam coders; they hold 0-255 pixels.
    images = np.stack([np.asarray(image) for image in batch])
    if images.min(initial=0) < 0 or images.max(initial=0) > 255:
        raise ValueError("embed_pixels_inference expects 0-255 pixel values")
    outputs = model.signatures["embed_pixels"](images=tf.constant(images.astype(np.uint8)))
    return [PredictionResult(example, embedding, model_id)
            for example, embedding in zip(batch, outputs["embedding"].numpy())]


class SavedModelHandler(TFModelHandlerTensor):
    """Beam's TF handler, loading with ``tf.saved_model.load``.

    The stock loader calls ``tf.keras.models.load_model``, which Keras 3 cannot
    use on a SavedModel; the export is a plain SavedModel with signatures.
    """

    def load_model(self):
        import tensorflow as tf

        return tf.saved_model.load(self._model_uri)


def _read_export_info(model_dir):
    path = f"{model_dir.rstrip('/')}/{EXPORT_INFO}"
    if not FileSystems.exists(path):
        raise MissingInput(f"--model {model_dir} is not an `ascl export` SavedModel version "
                           f"folder: {path} does not exist (pass saved_models/NAME/VERSION)")
    with FileSystems.open(path) as handle:
        return json.loads(handle.read())


def _export_label(class_name, class_names):
    """An image's label: its class's index in the export's classes, -1 when it has none."""
    return class_names.index(class_name) if class_name in class_names else -1


def _example_to_item(record, class_names):
    """A prepared example as ``(key, pixels)``; its label is its class's index in the
    export's classes (-1 when the export has no such class), as for folder inputs, so that a
    gallery's labels always mean the export's classes."""
    features = parse_example(record)
    pixels = decode_image(features["image/encoded"])
    class_name = features["class_name"].decode()
    return (json.dumps({"id": features["id"].decode(),
                        "label": _export_label(class_name, class_names),
                        "class_name": class_name,
                        "source_path": features["source_path"].decode()},
                       sort_keys=True), pixels)


class _ToPixels(beam.DoFn):
    """Decodes a folder's image; its label is its class folder's index in the export's classes
    (-1 when the folder is not one of them, or there is none)."""

    def __init__(self, size, class_names):
        self.size, self.class_names = size, list(class_names)

    def process(self, item):
        try:
            pixels = validate_pixels(decode_image(item["data"]), min_size=1)
            pixels = square_and_resize(pixels, self.size)
        except InvalidImage as error:
            yield beam.pvalue.TaggedOutput("dead", {"path": item["source_path"],
                                                    "reason": str(error)})
            return
        label = _export_label(item["class_name"], self.class_names)
        yield json.dumps({"id": item["id"], "label": label, "class_name": item["class_name"],
                          "source_path": item["source_path"]}, sort_keys=True), pixels


def _sample_rank(key):
    """A fixed pseudo-random rank of an embedding's id: the projector sample is the ids with
    the smallest ranks, the same on every run (Beam's Sample is random)."""
    example_id = json.loads(key)["id"]
    return int.from_bytes(hashlib.sha256(example_id.encode("utf-8")).digest()[:8], "big")


def _prepare_output(output, overwrite):
    """Refuses a non-empty output folder unless ``overwrite``; then empties it."""
    if not FileSystems.exists(output):
        FileSystems.mkdirs(output)
        return
    existing = [m.path for m in FileSystems.match([f"{output}/*"])[0].metadata_list]
    if existing and not overwrite:
        names = sorted(FileSystems.split(path.rstrip("/"))[1] for path in existing)
        raise OutputExists(f"{output} is not empty ({', '.join(names[:5])}"
                              f"{', ...' if len(names) > 5 else ''}); pass --overwrite to "
                              f"replace what is there, or choose another --output")
    if existing:
        FileSystems.delete(existing)


def _to_example(key, embedding):
    from tensorflow.core.example import example_pb2

    info = json.loads(key)
    example = example_pb2.Example()
    feature = example.features.feature
    feature["id"].bytes_list.value.append(info["id"].encode())
    feature["label"].int64_list.value.append(info["label"])
    feature["class_name"].bytes_list.value.append(info.get("class_name", "").encode())
    feature["source_path"].bytes_list.value.append(info.get("source_path", "").encode())
    feature["embedding"].float_list.value.extend(np.asarray(embedding, np.float32).tolist())
    return example.SerializeToString(deterministic=True)


def _to_row(key, embedding):
    """A Parquet row: the key's fields (parsed once) and the embedding."""
    info = json.loads(key)
    return {"id": info["id"], "label": info["label"], "class_name": info.get("class_name", ""),
            "source_path": info.get("source_path", ""),
            "embedding": np.asarray(embedding, np.float32).tolist()}


class _WriteProjector(beam.DoFn):
    def __init__(self, directory, class_names):
        self.directory, self.class_names = directory, class_names

    def process(self, sample):
        sample = sorted(sample)
        if not FileSystems.exists(self.directory):
            FileSystems.mkdirs(self.directory)
        keys = [json.loads(key) for key, _ in sample]
        vectors = "".join("\t".join(f"{v:.6f}" for v in emb) + "\n" for _, emb in sample)
        metadata = "id\tlabel\tclass\n" + "".join(
            f"{k['id']}\t{k['label']}\t{k.get('class_name') or self._name(k['label'])}\n"
            for k in keys)
        config = ('embeddings {\n  tensor_name: "embedding"\n  tensor_path: "vectors.tsv"\n'
                  '  metadata_path: "metadata.tsv"\n}\n')
        for name, text in (("vectors.tsv", vectors), ("metadata.tsv", metadata),
                           ("projector_config.pbtxt", config)):
            with FileSystems.create(FileSystems.join(self.directory, name)) as handle:
                handle.write(text.encode())
        yield len(sample)

    def _name(self, label):
        return self.class_names[label] if 0 <= label < len(self.class_names) else "unlabelled"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ascl embed", description=__doc__.split("\n\n")[0],
        epilog="Any other flag is a Beam PipelineOptions flag (--runner, --project, ...).")
    parser.add_argument("--model", required=True, help="an export: saved_models/NAME/VERSION")
    parser.add_argument("--input", required=True,
                        help="a prepared dataset folder, or folder:PATH of image files")
    parser.add_argument("--split", default="test", help="split of a prepared dataset")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--parquet", action="store_true", help="also write Parquet")
    parser.add_argument("--projector-samples", type=int, default=500,
                        help="embeddings written for TensorBoard's projector (0: none)")
    parser.add_argument("--batch-size", type=int, default=256, help="largest inference batch")
    parser.add_argument("--layout", default="auto", choices=["auto", "split/class", "class"],
                        help="for folder:PATH inputs, as for `ascl prepare`: where the class "
                             "folder is (labels come from it)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the contents of a non-empty --output")
    return parser


def run(argv=None):
    """Runs the job; returns the number of embeddings written."""
    # Over 60 lines on purpose: the job's steps (check the export and the output, build the
    # pipeline, write the info file last) in the order they run, like prepare.run.
    args, beam_args = build_parser().parse_known_args(argv)
    info = _read_export_info(args.model)
    height = info["image_shape"][0]
    options = PipelineOptions(beam_args)
    if options.view_as(StandardOptions).runner is None:
        options.view_as(StandardOptions).runner = "DirectRunner"
    output = args.output.rstrip("/")
    _prepare_output(output, args.overwrite)
    handler = KeyedModelHandler(SavedModelHandler(
        args.model, inference_fn=embed_pixels_inference, max_batch_size=args.batch_size))

    with beam.Pipeline(options=options) as pipeline:
        if args.input.startswith("folder:"):
            items = pipeline | "Read" >> ReadFolder(args.input[len("folder:"):], test_fraction=0.0,
                                                    layout=args.layout)
            decoded = items | "Decode" >> beam.ParDo(
                _ToPixels(height, info["class_names"])).with_outputs(
                "dead", main="valid")
            pixels = decoded.valid
            (decoded.dead | "DeadToJson" >> beam.Map(json.dumps)
             | "WriteDead" >> beam.io.WriteToText(f"{output}/dead_letters",
                                                  file_name_suffix=".jsonl", num_shards=1))
        else:
            manifest = load_manifest(args.input)
            if args.split not in manifest["splits"]:
                raise InputError(f"--split {args.split!r} is not in {args.input} "
                                 f"(it has {sorted(manifest['splits'])})")
            pixels = (pipeline
                      | "ReadShards" >> beam.io.ReadFromTFRecord(
                          FileSystems.join(args.input, shard_file_glob(args.split)))
                      | "Parse" >> beam.Map(_example_to_item, list(info["class_names"])))
        embeddings = (pixels
                      | "RunInference" >> RunInference(handler)
                      | "Unwrap" >> beam.MapTuple(lambda key, result: (key, result.inference)))
        (embeddings
         | "ToExample" >> beam.MapTuple(_to_example)
         | "WriteTFRecord" >> beam.io.WriteToTFRecord(f"{output}/{EMBEDDINGS_PREFIX}",
                                                      file_name_suffix=".tfrecord"))
        if args.parquet:
            import pyarrow

            schema = pyarrow.schema([("id", pyarrow.string()), ("label", pyarrow.int64()),
                                     ("class_name", pyarrow.string()),
                                     ("source_path", pyarrow.string()),
                                     ("embedding", pyarrow.list_(pyarrow.float32()))])
            (embeddings
             | "ToRow" >> beam.MapTuple(_to_row)
             | "WriteParquet" >> beam.io.WriteToParquet(f"{output}/{EMBEDDINGS_PREFIX}", schema,
                                                        file_name_suffix=".parquet"))
        if args.projector_samples:
            (embeddings
             | "Sample" >> beam.combiners.Top.Of(args.projector_samples,
                                                 key=lambda kv: _sample_rank(kv[0]), reverse=True)
             | "WriteProjector" >> beam.ParDo(_WriteProjector(f"{output}/projector",
                                                              info["class_names"])))
        count = embeddings | "Count" >> beam.combiners.Count.Globally()
        count | "WriteCount" >> beam.io.WriteToText(f"{output}/count", num_shards=1,
                                                    shard_name_template="", file_name_suffix=".txt")
    with FileSystems.open(f"{output}/count.txt") as handle:
        count = int(handle.read().decode().strip())
    _write_embed_info(output, args, info, count)
    return count


def _write_embed_info(output, args, export_info, count):
    """``embed_info.json``, written last: the export and the weights that made the embeddings
    (``weights_sha256``: null for an export made before exports recorded it)."""
    model = args.model if "://" in args.model else os.path.abspath(args.model)
    record = {"model": model, "weights_sha256": export_info.get("weights_sha256"),
              "run_dir": export_info.get("run_dir"), "checkpoint": export_info.get("checkpoint"),
              "embedding_dim": export_info.get("embedding_dim"), "input": args.input,
              "split": None if args.input.startswith("folder:") else args.split,
              "count": count}
    write_json(FileSystems.join(output, EMBED_INFO_NAME), record, indent=2)


def main(argv=None):
    logging.getLogger().setLevel(logging.WARNING)
    count = run(argv)
    print(f"wrote {count} embeddings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
