"""Serving a SavedModel as TF Serving would: in a fresh process that imports none of the
project, through its ``serving_default`` signature."""

import subprocess
import sys

import numpy as np


def serve_in_a_clean_process(model_dir, pngs, workdir):
    """``{"embedding", "projection"}`` arrays of ``serving_default`` on the PNG bytes
    ``pngs``, computed in a new Python process (which checks it loaded no project module)."""
    np.save(workdir / "pngs.npy", np.array(pngs, dtype=object), allow_pickle=True)
    script = (
        "import sys, numpy as np, tensorflow as tf\n"
        "assert not any(m.split('.')[0] in ('models', 'pipeline', 'beam_jobs', 'keras_hub') "
        "for m in sys.modules)\n"
        f"model = tf.saved_model.load({str(model_dir)!r})\n"
        f"pngs = np.load({str(workdir / 'pngs.npy')!r}, allow_pickle=True).tolist()\n"
        "out = model.signatures['serving_default'](image_bytes=tf.constant(pngs))\n"
        f"np.save({str(workdir / 'embedding.npy')!r}, out['embedding'].numpy())\n"
        f"np.save({str(workdir / 'projection.npy')!r}, out['projection'].numpy())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return {name: np.load(workdir / f"{name}.npy") for name in ("embedding", "projection")}
