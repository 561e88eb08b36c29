"""Settings for quick training runs on the 16 px digits, shared by several test modules."""

from pipeline.config import load_config

SMALL = [
    "model.projector_hidden=[64]", "model.projector_dim=32", "model.bn_splits=4",
    "ascl.memory_size=256", "optimizer.batch_size=64", "data.train_limit=512",
    "train.knn_every=1", "train.checkpoint_every=1", "train.verbose=0", "train.view_images=2",
    "evaluation.linear_epochs=2", "evaluation.projector_samples=50",
]


def small_config(manifest, *extra):
    """``configs/digits_small.yaml`` shrunk for tests, on the prepared dataset ``manifest``."""
    return load_config("configs/digits_small.yaml",
                       [f"data.dataset={manifest['directory']}", *SMALL, *extra])
