"""Benchmark: what the serving graph's pixel guard costs a normal request.

    python bench/image_guard_cost.py [--calls 500] [--json bench/results/image_guard_cost.json]

Times, in one process and alternating call by call, the decode step of
``serving_default`` as it is now (``pipeline.image_guard.guarded_decode``:
header read, size check, decode, check of the decoded size) against the bare
``tf.io.decode_image`` it replaced, both inside ``tf.map_fn`` in a
``tf.function`` as in the export, on batch-1 requests: a 32 px PNG (this
project's CIFAR-10 size) and a 1,024 x 768 JPEG photo-sized image.  Medians of
``--calls`` calls after warm-up, and the whole ``serving_default`` request of a
small-CNN export for scale.
"""

import argparse
import io
import json
import statistics
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.image_guard import DEFAULT_MAX_PIXELS, guarded_decode


def _decoder(decode):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def run(batch):
        return tf.map_fn(decode, batch, fn_output_signature=tf.TensorSpec([None, None, 3],
                                                                          tf.uint8))
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    small = tf.io.encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).numpy()
    buffer = io.BytesIO()
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
                        .resize((1024, 768), Image.BICUBIC))
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=90)
    photo = buffer.getvalue()
    bare = _decoder(lambda b: tf.io.decode_image(b, channels=3, expand_animations=False))
    guarded = _decoder(lambda b: guarded_decode(b, DEFAULT_MAX_PIXELS))
    results = {}
    for name, data in (("png_32px", small), ("jpeg_1024x768", photo)):
        request = tf.constant([data])
        times = {"bare": [], "guarded": []}
        for index in range(args.calls + 20):
            for label, fn in (("bare", bare), ("guarded", guarded)):
                start = time.perf_counter()
                fn(request).numpy()
                if index >= 20:
                    times[label].append(1000 * (time.perf_counter() - start))
        bare_ms, guarded_ms = (statistics.median(times[k]) for k in ("bare", "guarded"))
        results[name] = {"bare_decode_p50_ms": round(bare_ms, 3),
                         "guarded_decode_p50_ms": round(guarded_ms, 3),
                         "guard_ms": round(guarded_ms - bare_ms, 3)}
    from models import build_backbone, projection_head
    from pipeline.export import write_export

    manifest = {"image_shape": [32, 32, 3], "class_names": [str(i) for i in range(10)],
                "train_statistics": {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}}
    backbone = build_backbone("small_cnn", input_shape=(32, 32, 3), norm="split")
    path = write_export(backbone, projection_head(backbone.feature_dim), manifest,
                        tempfile.mkdtemp() + "/1")
    serve = tf.saved_model.load(path).signatures["serving_default"]
    request = tf.constant([small])
    for _ in range(20):
        serve(image_bytes=request)
    whole = []
    for _ in range(args.calls):
        start = time.perf_counter()
        serve(image_bytes=request)["embedding"].numpy()
        whole.append(1000 * (time.perf_counter() - start))
    results["small_cnn_serving_default_batch1_p50_ms"] = round(statistics.median(whole), 3)
    print(json.dumps(results, indent=1))
    if args.json:
        from beam_jobs.atomic_json import write_json  # imports TensorFlow

        write_json(args.json, {"command": "python bench/image_guard_cost.py "
                               f"--calls {args.calls} --json {args.json}", **results}, indent=1)


if __name__ == "__main__":
    main()
