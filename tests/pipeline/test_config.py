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
    assert (c.ascl.num_neighbors, c.ascl.mode) == (5, "ascl")
    assert (c.optimizer.lr, c.optimizer.reference_batch_size, c.optimizer.momentum,
            c.optimizer.weight_decay, c.optimizer.batch_size) == (0.03, 256, 0.9, 5e-4, 256)
    assert c.optimizer.warmup_epochs == 5 and c.optimizer.lr_scaling == "linear"
    assert c.data.blur is True and c.data.key_view == "weak" and c.data.crop_min_scale == 0.2
    assert (c.evaluation.knn_k, c.evaluation.knn_temperature) == (200, 0.1)
    assert (c.evaluation.linear_epochs, c.evaluation.linear_lr, c.evaluation.linear_milestones,
            c.evaluation.linear_batch_size, c.evaluation.linear_augment) == (
        100, 10.0, [0.6, 0.8], 256, True)


@pytest.mark.parametrize("path", ["configs/cifar10_resnet18.yaml",
                                  "configs/cifar10_small_cpu.yaml"])
def test_cifar_configs_use_the_reference_schedule_and_augmentations(path):
    c = load_config(path)
    assert (c.optimizer.lr, c.optimizer.batch_size, c.optimizer.warmup_epochs) == (0.03, 256, 5)
    assert c.data.blur is True and c.data.validation_size == 5000


def test_defaults_are_the_reference_settings():
    c = load_config(None)
    assert (c.optimizer.lr, c.optimizer.warmup_epochs, c.data.blur) == (0.03, 5.0, True)
    assert c.evaluation.linear_milestones == [0.6, 0.8] and c.evaluation.linear_lr == 10.0


def test_overrides_are_parsed_as_yaml():
    c = load_config("configs/digits_small.yaml",
                    ["optimizer.lr=0.03", "model.projector_hidden=[64, 32]", "data.cache=false",
                     "optimizer.warmup_epochs=5"])
    assert c.optimizer.lr == 0.03 and c.model.projector_hidden == [64, 32]
    assert c.data.cache is False and c.optimizer.warmup_epochs == 5.0


@pytest.mark.parametrize("override, message", [
    ("optimizer.weight_decy=0.1",
     r"unknown key optimizer.weight_decy \(did you mean 'weight_decay'"),
    ("optimiser.lr=0.1", r"unknown section 'optimiser' \(did you mean 'optimizer'"),
    ("optimizer.lr=fast", r"optimizer.lr must be of type float, received 'fast'"),
    ("optimizer.lr=-1", r"optimizer.lr must be > 0"),
    ("ascl.mode=simclr", r"ascl.mode must be one of"),
    ("ascl.num_neighbors=5000", r"ascl.num_neighbors must be <= ascl.memory_size"),
    ("ascl.momentum=1.5", r"ascl.momentum must be in \[0, 1\]"),
    ("train.epochs=0", r"train.epochs must be >= 1"),
    ("data.cache=yes please", r"data.cache must be true or false"),
    ("train.deterministic=sometimes", r"train.deterministic must be true or false"),
    ("ascl.momentum_schedule=linear", r"ascl.momentum_schedule must be one of \['constant', "
                                      r"'cosine'\], received 'linear'"),
    ("ascl.symmetric=true", r"ascl.symmetric is a BYOL-form option"),
    ("ascl.symmetric=both", r"ascl.symmetric must be true or false"),
    ("model.projector_hidden=512", r"model.projector_hidden must be a list"),
    ("optimizer", r"--set expects section.key=value"),
    ("data.validation_size=-1", r"data.validation_size must be >= 0"),
    ("data.validation_size=10.5", r"data.validation_size must be a whole count"),
    ("evaluation.linear_milestones=[60, 80]", r"evaluation.linear_milestones\[0\] must be a "
                                              r"fraction"),
    ("evaluation.linear_milestones=[0.8, 0.6]", r"evaluation.linear_milestones must be increasing"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits_small.yaml", [override])


@pytest.mark.parametrize("overrides, message", [
    (["ascl.framework=simclr"], r"ascl.framework must be one of \['moco', 'byol'\]"),
    (["ascl.mode=byol"], r"ascl.mode must be one of \['ascl', 'ahcl', 'hard', 'moco'\] with "
                         r"ascl.framework moco, received 'byol'"),
    (["ascl.framework=byol", "ascl.mode=ahcl"], r"ascl.mode must be one of \['ascl', 'byol'\] "
                                                r"with ascl.framework byol"),
    (["ascl.framework=byol", "optimizer.batch_size=1"], r"optimizer.batch_size must be >= 2"),
    (["model.predictor_hidden=[0]"], r"model.predictor_hidden\[0\] must be >= 1"),
    (["model.predictor_norm=layer"], r"model.predictor_norm must be one of"),
    (["ascl.framework=byol", "ascl.mode=byol", "ascl.byol_recipe=lightly"],
     r"ascl.byol_recipe must be one of \['reference', 'project'\], received 'lightly'"),
    (["ascl.byol_recipe=paper"], r"ascl.byol_recipe must be one of"),
    (["ascl.framework=byol", "ascl.mode=byol", "ascl.byol_recipe=[1]"],
     r"ascl.byol_recipe must be of type str"),
])
def test_framework_and_its_modes_are_validated_together(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits_small.yaml", overrides)


def test_byol_framework_ignores_the_queue_settings():
    config = load_config("configs/digits_small.yaml", [
        "ascl.framework=byol", "ascl.mode=byol", "ascl.memory_size=1", "ascl.num_neighbors=5"])
    assert (config.ascl.framework, config.ascl.mode) == ("byol", "byol")
    assert (config.model.predictor_hidden, config.model.predictor_norm) == ([512], "batch")


BYOL = ["ascl.framework=byol", "ascl.mode=byol"]


@pytest.mark.parametrize("path", ["configs/cifar10_resnet18.yaml", "configs/cifar10_small_cpu.yaml",
                                  None])
def test_the_byol_form_defaults_to_the_project_recipe_in_the_keys_a_config_leaves_unset(path):
    from pipeline.config import BYOL_RECIPES

    config = load_config(path, BYOL)
    assert config.ascl.byol_recipe == "project"
    for (section, key), value in BYOL_RECIPES["project"].items():
        assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    moco = load_config(path)  # the MoCo form keeps the reference's values
    assert (moco.optimizer.lr, moco.model.projector_norm) == (0.03, "none")


def test_the_reference_byol_recipe_is_the_settings_before_the_recipe_existed():
    config = load_config("configs/cifar10_small_cpu.yaml", [*BYOL, "ascl.byol_recipe=reference"])
    assert (config.optimizer.lr, config.model.projector_norm, config.ascl.symmetric,
            config.ascl.momentum_schedule, config.ascl.momentum) == (
        0.03, "none", False, "constant", 0.99)


def test_a_value_written_anywhere_wins_over_the_byol_recipe(tmp_path):
    assert load_config("configs/cifar10_small_cpu.yaml", [*BYOL, "optimizer.lr=0.05"]
                       ).optimizer.lr == 0.05
    assert load_config("configs/digits_small.yaml", BYOL).optimizer.lr == 0.06  # the file's
    written = tmp_path / "byol.yaml"
    written.write_text("ascl: {framework: byol, mode: byol}\nmodel: {projector_norm: none}\n")
    assert load_config(str(written)).model.projector_norm == "none"


def test_a_recorded_byol_config_reloads_to_itself(tmp_path):
    """A run's config.yaml sets every key, so a resumed run keeps its recipe even if the
    defaults change."""
    from pipeline.config import dump_config

    config = load_config("configs/cifar10_small_cpu.yaml", BYOL)
    dump_config(config, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == config


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))


@pytest.mark.parametrize("typed, value", [("on", True), ("off", False), ("'on'", True),
                                          ("'off'", False), ("true", True), ("no", False)])
def test_switches_accept_what_users_type(typed, value):
    assert load_config("configs/digits_small.yaml", [f"data.blur={typed}"]).data.blur is value


@pytest.mark.parametrize("typed, value", [("on", "on"), ("off", "off"), ("auto", "auto"),
                                          ("'on'", "on")])
def test_on_off_choices_survive_yaml(typed, value):
    assert load_config("configs/digits_small.yaml",
                       [f"train.jit_compile={typed}"]).train.jit_compile == value
