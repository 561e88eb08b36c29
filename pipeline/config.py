"""Experiment configuration: one YAML file per experiment, overridable from the CLI.

A config has fixed sections and keys (the dataclasses below, which are also
the documentation of every setting).  Loading checks everything before any
work starts: an unknown or misspelt key, a value of the wrong type or out of
range raises ``ConfigError`` naming ``section.key``.

    config = load_config("configs/cifar10_resnet18.yaml", ["optimizer.lr=0.03"])
"""

import dataclasses
import difflib
import os
import typing

import yaml

from beam_jobs.errors import InputError
from models.backbones import BACKBONES, STEMS
from models.catalog import is_catalog_name
from models.momentum_encoder import MOMENTUM_SCHEDULES
from models.normalization import NORMALIZATIONS
from models.objective import BYOL_MODES, MODES


class ConfigError(InputError):
    """A configuration problem; the message names the offending ``section.key``."""


# The BYOL form's defaults, by ``ascl.byol_recipe``: each fills a key only where the config
# and the overrides leave it unset, so a value written anywhere always wins.  ``reference``
# is the official code's recipe, which is the dataclass defaults (the MoCo form's optimiser,
# no batch norm in the projector, one direction, constant EMA); at 20 epochs of CIFAR-10 it
# ends below kNN on raw pixels.  ``project`` is this project's departure, measured in
# BENCHMARKS.md ("The BYOL diagnosis"): batch norm after the projector's hidden layer, as
# BYOL, lightly and solo-learn all have (without it the loss sits at 0.18 from epoch 2), and
# an 8x learning rate (0.24 at batch 256), because 2 - 2 cos has far smaller gradients than
# InfoNCE at t1 = 0.1.  With BN, validation kNN rose 47.2 / 50.5 / 50.9 at lr 0.12 / 0.24 /
# 0.48: the last step is within one seed's spread, so the smaller departure was taken.
BYOL_RECIPES = {
    "reference": {},
    "project": {("model", "projector_norm"): "batch", ("optimizer", "lr"): 0.24},
}


def _with_byol_recipe(raw):
    """``raw`` with the chosen BYOL recipe's values in the keys it leaves unset (a no-op for
    the MoCo form and for a config that sets every key, as a run's recorded config.yaml)."""
    ascl = raw.get("ascl")
    if not isinstance(ascl, dict) or ascl.get("framework") != "byol":
        return raw
    recipe = ascl.get("byol_recipe", AsclConfig.byol_recipe)
    if not isinstance(recipe, str):
        return raw  # from_dict refuses its type, naming the field
    _choice("ascl.byol_recipe", recipe, BYOL_RECIPES)
    filled = {name: values for name, values in raw.items()}
    for (section, key), value in BYOL_RECIPES[recipe].items():
        values = filled.get(section) or {}
        if isinstance(values, dict) and key not in values:
            filled[section] = {**values, key: value}
    return filled


def _one_of(default, choices):
    """A field whose value must be one of ``choices``: declared here once, ``validate`` and
    the CLI's ``choices`` read them (``choices_of``)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def _bounded(default=None, *, at_least=None, above=None, factory=None):
    """A number (or a list of numbers, from ``factory``) that must be ``>= at_least`` or
    ``> above``: the bound is declared with the field and ``validate`` checks it."""
    metadata = {"at_least": at_least} if at_least is not None else {"above": above}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class DataConfig:
    dataset: str = ""                 # folder written by `ascl prepare` (local or gs://)
    train_split: str = "train"
    eval_split: str = "test"          # labelled split for evaluation and the test-split kNN curve
    validation_size: float = 0.1      # held out of train_split (never pre-trained on) to choose
                                      # the `best` checkpoint by kNN: a count if >= 1, a fraction
                                      # if < 1, 0 for none (then there is no `best`)
    key_view: str = _one_of("weak", ("weak", "strong"))  # "weak" (crop + flip) or "strong"
                                      # (the paper's ablation)
    blur: bool = True                 # Gaussian blur in the strong view (p 0.5, sigma 0.1-2 px),
                                      # at every image size as in the reference
    crop_min_scale: float = 0.2
    flip: bool = True                 # random horizontal flips (off for digits and text)
    shuffle_buffer: int = _bounded(10_000, at_least=1)
                                      # when a split is not cached; a cached one is shuffled whole
    cache: bool = True
    train_limit: int = _bounded(0, at_least=0)
                                      # train on a fixed class-mixed sample of N images (0: all)
    eval_limit: int = _bounded(0, at_least=0)
                                      # evaluate on a fixed class-mixed sample of N per split


@dataclasses.dataclass
class ModelConfig:
    backbone: str = "resnet18"        # one of BACKBONES, or a catalogue network:
                                      # keras.applications.NAME or keras_hub.NAME
                                      # (models.catalog; KerasHub: pip install .[hub])
    backbone_args: typing.Dict[str, typing.Any] = dataclasses.field(default_factory=dict)
                                      # a catalogue network's constructor arguments
    pretrained: str = ""              # keras.applications: imagenet (downloads the weights)
    preset: str = ""                  # KerasHub: a preset name or folder (its architecture
                                      # and weights; model.backbone_args then override)
    stem: str = _one_of("cifar", STEMS)
    norm: str = _one_of("split", NORMALIZATIONS)
    bn_splits: int = _bounded(8, at_least=1)
    cnn_widths: typing.List[int] = _bounded(at_least=1, factory=lambda: [32, 64, 128])
                                      # small_cnn
    projector_hidden: typing.List[int] = _bounded(at_least=1, factory=lambda: [2048])
    projector_dim: int = _bounded(128, at_least=1)
    projector_norm: str = _one_of("none", NORMALIZATIONS)
    predictor_hidden: typing.List[int] = _bounded(at_least=1, factory=lambda: [512])
                                      # ascl.framework byol: the predictor projector_dim ->
    predictor_norm: str = _one_of("batch", NORMALIZATIONS)  # hidden -> projector_dim
                                      # (reference: 512, batch norm)


@dataclasses.dataclass
class AsclConfig:
    framework: str = _one_of("moco", ("moco", "byol"))  # moco: memory queue (ASCLModel);
                                      # byol: in-batch neighbours, predictor, no queue
                                      # (BYOLModel)
    mode: str = "ascl"                # moco: ascl | ahcl | hard | moco; byol: ascl | byol
    memory_size: int = _bounded(4096, at_least=1)           # moco only
    momentum: float = 0.99
    t1: float = _bounded(0.1, above=0)                   # moco only
    t2: float = _bounded(0.05, above=0)
    num_neighbors: int = _bounded(5, at_least=1)
    shuffle_keys: bool = True         # moco only (BYOL's target has no key shuffle)
    symmetric: bool = False           # byol only: add the weak-predicts-strong direction
    momentum_schedule: str = _one_of("constant", MOMENTUM_SCHEDULES)  # constant | cosine
                                      # (BYOL's: momentum -> 1)
    byol_recipe: str = _one_of("project", BYOL_RECIPES)  # byol only: the defaults of the
                                      # keys a config leaves unset (BYOL_RECIPES): project
                                      # (learns at small scale) or reference (the official
                                      # code's; does not learn)


@dataclasses.dataclass
class OptimizerConfig:
    batch_size: int = 256             # global batch size
    lr: float = _bounded(0.03, above=0)
                                      # base learning rate at reference_batch_size (reference)
    lr_scaling: str = _one_of("linear", ("linear", "none"))  # "linear": lr * batch_size /
                                      # reference_batch_size; "none"
    reference_batch_size: int = _bounded(256, at_least=1)
    momentum: float = 0.9
    weight_decay: float = _bounded(5e-4, at_least=0.0)
                                      # L2 on every trainable weight, as torch.optim.SGD does
    warmup_epochs: float = _bounded(5.0, at_least=0.0)
                                      # linear warm-up from 0, then cosine to 0 (per step)


@dataclasses.dataclass
class TrainConfig:
    epochs: int = _bounded(200, at_least=1)
    seed: int = 0
    deterministic: bool = False       # true: also TensorFlow's op determinism (same seed and
                                      # machine give identical weights; measured cost in
                                      # BENCHMARKS.md); process-wide once on
    strategy: str = _one_of("auto", ("auto", "default", "mirrored", "multi_worker"))
                                      # auto | default | mirrored | multi_worker
    mixed_precision: str = _one_of("auto", ("auto", "none", "mixed_bfloat16",
                                             "mixed_float16"))
                                      # auto | none | mixed_bfloat16 | mixed_float16; auto:
                                      # bfloat16 where the hardware has it (pipeline.precision)
    jit_compile: str = _one_of("auto", ("auto", "on", "off"))  # auto | on | off
    steps_per_execution: int = _bounded(1, at_least=1)
    checkpoint_every: int = _bounded(10, at_least=1)        # epochs between checkpoints
    knn_every: int = _bounded(10, at_least=0)
                                      # epochs between kNN evaluations (0: never)
    view_images: int = _bounded(4, at_least=0)
                                      # augmented pairs written to TensorBoard at the start
    verbose: int = _one_of(1, (0, 1, 2))  # Keras progress: 1 progress bar, 2 one line per
                                      # epoch, 0 silent


@dataclasses.dataclass
class EvaluationConfig:
    knn_k: int = _bounded(200, at_least=1)
    knn_temperature: float = _bounded(0.1, above=0)
    batch_size: int = _bounded(512, at_least=1)
    linear_epochs: int = _bounded(100, at_least=0)
    linear_lr: float = _bounded(10.0, above=0)
    linear_milestones: typing.List[float] = dataclasses.field(default_factory=lambda: [0.6, 0.8])
                                      # fractions of linear_epochs where the lr drops tenfold
    linear_batch_size: int = _bounded(256, at_least=1)
                                      # linear_lr is for batch 256, scaled linearly
    linear_augment: bool = True       # RandomResizedCrop + flip views through the frozen backbone
                                      # every epoch; false: features of centre views, once
    raw_pixel_probe: bool = True      # also the same linear probe on raw pixels (the probe's
                                      # baseline; doubles the probe's cost)
    projector_samples: int = _bounded(1000, at_least=0)
                                      # test embeddings written for TensorBoard's projector


@dataclasses.dataclass
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    ascl: AsclConfig = dataclasses.field(default_factory=AsclConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


# YAML 1.1 reads these as booleans unquoted; quoted, they arrive as strings.
_BOOL_WORDS = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def choices_of(path):
    """The choices of the setting ``section.key`` (for the CLI's ``choices``)."""
    section, key = path.split(".")
    fields = {f.name: f for f in dataclasses.fields(Config)}
    (field,) = [f for f in dataclasses.fields(fields[section].default_factory) if f.name == key]
    return list(field.metadata["choices"])


def _suggest(name, choices):
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(path, value, annotation):
    """Checks ``value`` against a field type; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Dict):
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise ConfigError(f"{path} must be a mapping of argument names to values, received "
                              f"{value!r}")
        return dict(value)
    if origin in (list, typing.List):
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list of {item_type.__name__}, received {value!r}")
        return [_coerce(f"{path}[{i}]", item, item_type) for i, item in enumerate(value)]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, received {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot, no sign) as a string
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 read the documented on/off as a boolean
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, annotation) or isinstance(value, bool) and annotation is not bool:
        raise ConfigError(f"{path} must be of type {annotation.__name__}, received {value!r} "
                          f"({type(value).__name__})")
    return value


def _require(holds, path, expected, value):
    """``ConfigError`` "PATH must be EXPECTED, received VALUE" unless ``holds``."""
    if not holds:
        raise ConfigError(f"{path} must be {expected}, received {value!r}")


def _choice(path, value, choices):
    _require(value in choices, path, f"one of {list(choices)}", value)


def validate(config):
    """Range and consistency checks; raises ``ConfigError`` naming the key."""
    d, a, o, e = config.data, config.ascl, config.optimizer, config.evaluation
    for section in dataclasses.fields(config):  # the bounds declared with the fields
        values = getattr(config, section.name)
        for field in dataclasses.fields(values):
            path, value, bounds = (f"{section.name}.{field.name}", getattr(values, field.name),
                                   field.metadata)
            if "choices" in bounds:
                _choice(path, value, bounds["choices"])
            for index, item in (enumerate(value) if isinstance(value, list) else [(None, value)]):
                where = path if index is None else f"{path}[{index}]"
                if "at_least" in bounds:
                    _require(item >= bounds["at_least"], where, f">= {bounds['at_least']}", item)
                if "above" in bounds:
                    _require(item > bounds["above"], where, f"> {bounds['above']}", item)
    if d.validation_size < 0:
        raise ConfigError(f"data.validation_size must be >= 0 (a count if >= 1, a fraction if "
                          f"< 1), received {d.validation_size!r}")
    if d.validation_size >= 1 and not float(d.validation_size).is_integer():
        raise ConfigError(f"data.validation_size must be a whole count when >= 1, received "
                          f"{d.validation_size!r}")
    if not 0.0 < d.crop_min_scale <= 1.0:
        raise ConfigError(f"data.crop_min_scale must be in (0, 1], received {d.crop_min_scale!r}")
    modes = MODES if a.framework == "moco" else BYOL_MODES
    if a.mode not in modes:
        raise ConfigError(f"ascl.mode must be one of {list(modes)} with ascl.framework "
                          f"{a.framework}, received {a.mode!r}")
    if a.framework == "moco" and a.num_neighbors > a.memory_size:
        raise ConfigError(f"ascl.num_neighbors must be <= ascl.memory_size ({a.memory_size}), "
                          f"received {a.num_neighbors}")
    if not 0.0 <= a.momentum <= 1.0:
        raise ConfigError(f"ascl.momentum must be in [0, 1], received {a.momentum!r}")
    if a.symmetric and a.framework != "byol":
        raise ConfigError("ascl.symmetric is a BYOL-form option (ascl.framework byol); "
                          f"received it with ascl.framework {a.framework}")
    m = config.model
    catalog = is_catalog_name(m.backbone)
    _require(m.backbone in BACKBONES or catalog, "model.backbone",
             f"one of {list(BACKBONES)}, keras.applications.NAME or keras_hub.NAME", m.backbone)
    for key in ("backbone_args", "pretrained", "preset"):
        if getattr(m, key) and not catalog:
            raise ConfigError(f"model.{key} is for a catalogue backbone (keras.applications.NAME "
                              f"or keras_hub.NAME); model.backbone is {m.backbone!r}")
    _require(m.pretrained in ("", "imagenet"), "model.pretrained", "imagenet or empty",
             m.pretrained)
    least = 2 if a.framework == "byol" else 1  # BYOL's neighbours are the batch's others
    _require(o.batch_size >= least, "optimizer.batch_size", f">= {least}", o.batch_size)
    if not 0.0 <= o.momentum < 1.0:
        raise ConfigError(f"optimizer.momentum must be in [0, 1), received {o.momentum!r}")
    for index, fraction in enumerate(e.linear_milestones):
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"evaluation.linear_milestones[{index}] must be a fraction of "
                              f"evaluation.linear_epochs in (0, 1), received {fraction!r}")
    if list(e.linear_milestones) != sorted(set(e.linear_milestones)):
        raise ConfigError(f"evaluation.linear_milestones must be increasing, received "
                          f"{e.linear_milestones!r}")
    return config


def from_dict(raw):
    """A validated ``Config`` from nested dicts (as read from YAML)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, received {type(raw).__name__}")
    raw = _with_byol_recipe(raw)
    sections = {field.name: field for field in dataclasses.fields(Config)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown section {name!r}{_suggest(name, sections)}; "
                              f"sections are {list(sections)}")
        section_type = sections[name].default_factory
        fields = {f.name: f for f in dataclasses.fields(section_type)}
        hints = typing.get_type_hints(section_type)
        values = values or {}
        if not isinstance(values, dict):
            raise ConfigError(f"section {name!r} must be a mapping, received {values!r}")
        kwargs = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key {name}.{key}{_suggest(key, fields)}; "
                                  f"{name} has {list(fields)}")
            kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        built[name] = section_type(**kwargs)
    return validate(Config(**built))


def apply_overrides(raw, overrides):
    """Applies ``section.key=value`` strings (values parsed as YAML) to nested dicts."""
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"a config must be a mapping of sections, received {type(raw).__name__}")
    for section, values in (raw or {}).items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping, received {values!r}")
    raw = {section: dict(values or {}) for section, values in (raw or {}).items()}
    for override in overrides or []:
        path, sep, text = override.partition("=")
        if not sep or path.count(".") != 1:
            raise ConfigError(f"--set expects section.key=value, received {override!r}")
        section, key = path.split(".")
        raw.setdefault(section, {})[key] = yaml.safe_load(text)
    return raw


def load_config(path=None, overrides=None):
    """Reads a YAML config (or the defaults), applies overrides, validates."""
    raw = {}
    if path:
        try:
            with open(path) as handle:
                raw = yaml.safe_load(handle)
        except FileNotFoundError as error:
            raise ConfigError(f"config file {path} does not exist") from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    return from_dict(apply_overrides(raw, overrides))


def dump_config(config, path):
    """Writes the config as YAML, atomically: another worker of the run may be reading it."""
    with open(path + ".tmp", "w") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=False)
    os.replace(path + ".tmp", path)
