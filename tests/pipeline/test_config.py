"""Experiment configuration: loading, overrides and errors that name the key."""

import glob

import pytest

from pipeline.config import ConfigError, load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.data.dataset


def test_reference_config_holds_the_reference_settings():
    c = load_config("configs/cifar10_resnet18.yaml")
    assert (c.model.backbone, c.model.stem, c.model.norm, c.model.bn_splits) == (
        "resnet18", "cifar", "split", 8)
    assert (c.model.projector_hidden, c.model.projector_dim) == ([2048], 128)
    assert (c.ascl.memory_size, c.ascl.momentum, c.ascl.t1, c.ascl.t2) == (4096, 0.99, 0.1, 0.05)
    assert (c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay,
            c.optimizer.batch_size) == (0.06, 0.9, 5e-4, 256)
    assert (c.evaluation.knn_k, c.evaluation.knn_temperature) == (200, 0.1)


def test_overrides_are_parsed_as_yaml():
    c = load_config("configs/digits_small.yaml",
                    ["optimizer.lr=0.03", "model.projector_hidden=[64, 32]", "data.cache=false",
                     "optimizer.warmup_epochs=2"])
    assert c.optimizer.lr == 0.03 and c.model.projector_hidden == [64, 32]
    assert c.data.cache is False and c.optimizer.warmup_epochs == 2.0


@pytest.mark.parametrize("override, message", [
    ("optimizer.weight_decy=0.1", r"unknown key optimizer.weight_decy \(did you mean 'weight_decay'"),
    ("optimiser.lr=0.1", r"unknown section 'optimiser' \(did you mean 'optimizer'"),
    ("optimizer.lr=fast", r"optimizer.lr must be of type float, received 'fast'"),
    ("optimizer.lr=-1", r"optimizer.lr must be > 0"),
    ("ascl.mode=simclr", r"ascl.mode must be one of"),
    ("ascl.num_neighbors=5000", r"ascl.num_neighbors must be <= ascl.memory_size"),
    ("ascl.momentum=1.5", r"ascl.momentum must be in \[0, 1\]"),
    ("train.epochs=0", r"train.epochs must be >= 1"),
    ("data.cache=yes please", r"data.cache must be true or false"),
    ("model.projector_hidden=512", r"model.projector_hidden must be a list"),
    ("optimizer", r"--set expects section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits_small.yaml", [override])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
