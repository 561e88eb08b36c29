"""``ascl search``: the gallery neighbours of one image, through the export's ``neighbors``.

It calls the SavedModel's ``neighbors`` signature, the function TF Serving
runs, so what it prints is what a served model answers.  ``--sheet`` draws a
contact sheet: the query beside its neighbours, each with its score and label
(a neighbour whose source file cannot be opened here is drawn as a grey tile).
"""

import json
import os

import numpy as np
import tensorflow as tf

from beam_jobs.errors import InputError, MissingInput
from pipeline.export import INFO_FILE


def load_export(model_dir):
    """``(loaded SavedModel, its ascl_export.json)``; refuses an export without ``neighbors``."""
    info_path = os.path.join(model_dir, INFO_FILE)
    if not tf.io.gfile.exists(os.path.join(model_dir, "saved_model.pb")):
        raise MissingInput(f"--model {model_dir} is not a SavedModel version folder (pass "
                                f"saved_models/NAME/VERSION)")
    info = {}
    if tf.io.gfile.exists(info_path):
        with tf.io.gfile.GFile(info_path) as handle:
            info = json.load(handle)
    model = tf.saved_model.load(model_dir)
    if "neighbors" not in model.signatures:
        raise InputError(f"{model_dir} has no `neighbors` signature: export it with a gallery, "
                         f"`ascl export --run-dir RUN --name NAME --gallery EMBED_OUTPUT`")
    return model, info


def search_image(model_dir, image_path, k=None):
    """The ``k`` (default: 8, or the export's k if smaller) nearest gallery images of the
    image file ``image_path``: a list of ``{"rank", "id", "score", "label", "class_name",
    "path"}``, best first."""
    model, info = load_export(model_dir)
    exported_k = int(info.get("gallery", {}).get("k", 0)) or None
    if k is None:
        k = min(8, exported_k or 8)
    if k < 1 or (exported_k is not None and k > exported_k):
        raise InputError(f"--k {k} must be between 1 and the k the export was made with "
                         f"({exported_k}); export again with a larger --k for more")
    with tf.io.gfile.GFile(image_path, "rb") as handle:
        image_bytes = handle.read()
    try:
        out = model.signatures["neighbors"](image_bytes=tf.constant([image_bytes]))
    except tf.errors.InvalidArgumentError as error:
        raise InputError(f"--image {image_path}: the model refused it: "
                         f"{_reason(error.message)}") from error
    names = info.get("class_names", [])
    rows = []
    for rank in range(k):
        label = int(out["labels"][0, rank])
        rows.append({"rank": rank + 1, "id": out["ids"][0, rank].numpy().decode(),
                     "score": float(out["scores"][0, rank]), "label": label,
                     "class_name": names[label] if 0 <= label < len(names) else "",
                     "path": out["paths"][0, rank].numpy().decode()})
    return rows, image_bytes


def _reason(message):
    """The graph's own words from a TensorFlow error (after "assertion failed: "), without
    the "Graph execution error" preamble and node names."""
    for line in message.splitlines():
        if "assertion failed: " in line:
            return line.split("assertion failed: ", 1)[1].strip(" []")
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.strip().startswith(("[[", "Graph execution error"))]
    return lines[0] if lines else message


def format_rows(rows):
    """The neighbours as an aligned text table."""
    header = ("rank", "score", "label", "class", "id", "path")
    table = [header] + [(str(r["rank"]), f"{r['score']:.4f}", str(r["label"]),
                         r["class_name"] or "-", r["id"], r["path"] or "-") for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths))
                     + "  " + line[-1] for line in table)


def _tile(path):
    """The neighbour's source image as RGB pixels, or ``None`` when it cannot be read here."""
    from PIL import Image

    try:
        with tf.io.gfile.GFile(path, "rb") as handle, Image.open(handle) as image:
            return np.asarray(image.convert("RGB"))
    except Exception:  # a missing or unreadable file is drawn as a grey tile, not an error
        return None


def draw_contact_sheet(image_bytes, rows, path, *, columns=9):
    """Writes ``path`` (PNG): the query, then its neighbours with score and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    query = tf.io.decode_image(image_bytes, channels=3, expand_animations=False).numpy()
    tiles = [(query, "query")] + [
        (_tile(r["path"]) if r["path"] else None,
         f"#{r['rank']} {r['score']:.3f}\n{r['class_name'] or r['label']}") for r in rows]
    columns = min(columns, len(tiles))
    lines = -(-len(tiles) // columns)
    figure, axes = plt.subplots(lines, columns, figsize=(1.6 * columns, 1.9 * lines),
                                squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (pixels, title) in zip(axes.flat, tiles):
        if pixels is None:
            axis.imshow(np.full((8, 8, 3), 200, np.uint8))
            axis.text(0.5, 0.5, "file not\nfound", ha="center", va="center", fontsize=7,
                      transform=axis.transAxes)
        else:
            axis.imshow(pixels, interpolation="nearest")
        axis.set_title(title, fontsize=8, color="tab:blue" if title == "query" else "black")
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    staging = os.path.join(directory, f".{os.path.basename(path)}.tmp.png")
    figure.savefig(staging, dpi=120)
    plt.close(figure)
    os.replace(staging, path)
    return path
