"""The config schema: typed dataclasses Hydra validates every composed config against.

`configs/train.yaml` lists `fgvr_train` first in its defaults, so a wrong key, a value of the
wrong type or an enum value that does not exist fails at composition, before any work starts.
Groups whose keys depend on the chosen class (head, selector, texture, method) are checked when they
are instantiated instead (`instantiate`).

Every default lives here; the YAML files under configs/ state only what differs from it. Each
field also says what it means for a run's result (`neutral`, `resumable`), which `fgvr table`
and resuming a run ask about.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import MISSING

from fgvr.runtime.errors import ConfigError, FgvrError, first_line


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, neutral: bool = False,
            resumable: bool | None = None) -> Any:
    """A schema field flagged with what it means for a run's result. `neutral`: it cannot change one
    (where files live, logging, workers, compilation), so `fgvr table` averages runs that differ in it.
    `resumable` (default: `neutral`): a resumed run may change it. A flagged section flags all its keys."""
    return field(default=default, default_factory=factory, metadata=_flags(neutral, resumable))


def bounded(default: Any, low: float | None = None, high: float | None = None, high_open: bool = False,
            low_open: bool = False, neutral: bool = False, resumable: bool | None = None) -> Any:
    """A schema field whose value must lie in [low, high] (an end open where asked); None passes.
    `neutral` and `resumable` as for setting()."""
    return field(default=default, metadata={"range": (low, high, low_open, high_open), **_flags(neutral, resumable)})


def _flags(neutral: bool, resumable: bool | None) -> dict[str, bool]:
    return ({"neutral": True} if neutral else {}) | ({} if resumable is None else {"resumable": resumable})


def _in_range(value: float, low, high, low_open: bool, high_open: bool) -> bool:
    return not ((low is not None and (value < low or (low_open and value == low)))
                or (high is not None and (value > high or (high_open and value == high))))


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"{'<' if high_open else '<='} {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_values(cfg: Any, schema: type, prefix: str = "") -> None:
    """Every bounded field of the schema (and of its nested sections) within its range: sizes,
    counts and fractions a config can type correctly but not mean (batch_size=0, val_fraction=1.5)."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        value = cfg.get(f.name) if hasattr(cfg, "get") else None
        if value is None:
            continue
        key = f"{prefix}{f.name}"
        if "range" in f.metadata and isinstance(value, (int, float)):
            if not math.isfinite(value) or not _in_range(value, *f.metadata["range"]):
                raise ConfigError(f"{key}={value}: must be {_range_text(*f.metadata['range'])}")
        section = _section(hints[f.name])
        if section is not None:
            check_values(value, section, key + ".")


def _section(hint: Any) -> type | None:
    """The schema of a nested section (an Optional one included), or None for a plain value."""
    return next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)


def config_dir() -> Path:
    """The configs/ folder: inside the package when installed as a wheel, else the repo's."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parent / "configs"


class Precision(Enum):
    auto = "auto"  # bf16 on CUDA, fp32 elsewhere
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # with a GradScaler


class DataFormat(Enum):
    """What data.root holds: it picks the reader and, for a benchmark, its official totals."""

    # The benchmarks of fgvr/data/catalog.py, each in its official files.
    cub = "cub"
    nabirds = "nabirds"
    cars = "cars"
    aircraft = "aircraft"
    dogs = "dogs"
    flowers = "flowers"
    pets = "pets"
    inat2017 = "inat2017"
    # A layout of your own: root/{train,test}/<class>/*.jpg, or root/<train_csv> and root/<test_csv>.
    folder = "folder"
    csv = "csv"
    # Generated from data.synth into paths.cache_dir (unless data.root is set) in the CUB layout.
    synth = "synth"


class DataCache(Enum):
    none = "none"  # decode every image file in every epoch
    decoded = "decoded"  # decode and resize once into a memory-mapped uint8 array under paths.cache_dir


class Tta(Enum):
    none = "none"
    flip = "flip"  # the mean of the logits of the images and of their mirror images


class PredictFormat(Enum):
    csv = "csv"
    jsonl = "jsonl"  # JSON lines: one object per image


class ExportFormat(Enum):
    onnx = "onnx"  # checked with onnxruntime
    torchscript = "torchscript"  # torch.jit, loadable without fgvr
    exported = "exported"  # torch.export's ExportedProgram (.pt2)


class LrScale(Enum):
    none = "none"  # optim.lr as given, whatever the batch of a step
    linear = "linear"  # x (step batch / optim.lr_batch_size)
    sqrt = "sqrt"  # x sqrt(step batch / optim.lr_batch_size)


@dataclass
class BackboneConfig:
    _target_: str = "fgvr.models.backbone.Backbone"
    name: str = MISSING  # any timm model name, optionally with a pretrained tag
    pretrained: bool = False
    checkpoint: Optional[str] = None  # local weights file; implies pretrained
    drop_path_rate: float = bounded(0.0, 0, 1, high_open=True)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm constructor arguments
    # A linear probe: the backbone's weights stay as loaded (and its norms in eval mode); only the
    # head, the aggregator and the region method's own modules train.
    freeze: bool = False


@dataclass
class AugmentConfig:
    hflip: bool = True
    trivial_augment: bool = False
    random_erasing: float = bounded(0.0, 0, 1)  # probability
    # Batch mixing through timm's Mixup (its targets carry trainer.label_smoothing); 0: off.
    mixup: float = bounded(0.0, 0)  # mixup's Beta(alpha, alpha)
    cutmix: float = bounded(0.0, 0)  # cutmix's Beta(alpha, alpha)
    mix_prob: float = bounded(1.0, 0, 1)  # of mixing a batch at all
    mix_switch_prob: float = bounded(0.5, 0, 1)  # of cutmix instead of mixup when both are on


class SynthKind(Enum):
    discs = "discs"  # data=synth: the class is the grating of the one warm disc, visible at the input size
    parts = "parts"  # data=synth_parts: the class is a fine grating only a full-resolution crop resolves


@dataclass
class SynthConfig:
    """The generated data sets (fgvr/data/synth.py). The `parts` knobs apply to kind=parts only (and
    are range-checked there, where they depend on each other)."""

    kind: SynthKind = SynthKind.discs
    num_classes: int = bounded(10, 2)
    train_per_class: int = bounded(160, 1)
    test_per_class: int = bounded(40, 1)
    image_size: int = bounded(96, 8)  # side of the stored images (the source resolution)
    distractors: int = bounded(3, 0)
    seed: int = 0  # of the generator, not of the run
    groups: int = 4  # parts: part colours; classes of a colour differ only in the fine detail
    part_size: float = 0.2  # parts: the part's diameter, as a fraction of the image side
    detail_freq: float = 0.25  # parts: the fine grating's frequency, cycles per pixel of the stored image
    distractor_similarity: float = 0.3  # parts: 0 grey distractors .. 1 as saturated as the part


@dataclass
class DataConfig:
    name: str = MISSING  # the data set's name in reports (results.json's dataset, tables, W&B)
    format: DataFormat = MISSING  # what root holds: the reader, and a benchmark's official totals
    root: Optional[str] = setting(None, neutral=True)  # required, but for data=synth*: generated into paths.cache_dir
    img_size: int = bounded(224, 1)
    resize_ratio: float = bounded(1.34, 1)  # train: square resize to ratio*img_size, then random crop
    batch_size: int = bounded(32, 1)
    eval_batch_size: Optional[int] = bounded(None, 1, neutral=True)  # default: 2 x batch_size
    num_workers: Optional[int] = bounded(None, 0, neutral=True)  # default: min(8, this process's share of the cores)
    val_fraction: float = bounded(0.1, 0, 1, high_open=True)
    # Skip (and count) unreadable images instead of stopping at the first; a resumed run may switch it on
    # to get past a bad image, though the images it skips change the result.
    skip_bad: bool = setting(False, resumable=True)
    # Before training, compare the split sizes with the data set's official totals (fgvr/data/catalog.py),
    # so that a wrong or half-extracted data.root fails in seconds; false to train on a subset.
    check_counts: bool = setting(True, neutral=True)
    # decoded: decode and resize every image once into a memory-mapped cache under paths.cache_dir.
    cache: DataCache = setting(DataCache.none, neutral=True)
    level: Optional[str] = None  # which labels, where a data set has levels (aircraft: variant, family, manufacturer)
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synth: Optional[SynthConfig] = None


@dataclass
class OptimConfig:
    """The optimiser: `_target_` (a torch.optim class) made over the model's parameters at lr, with
    momentum and betas where set (engine/optim.py); the schedule keys after them are not its arguments."""

    _target_: str = MISSING  # torch.optim.SGD (optim=sgd), torch.optim.AdamW (optim=adamw), ...
    lr: float = bounded(MISSING, 0, low_open=True)
    weight_decay: float = bounded(0.0, 0)  # never on norms, biases, position embeddings and tokens
    momentum: Optional[float] = bounded(None, 0, 1)  # SGD's; null: the class's default
    betas: Optional[List[float]] = None  # Adam's; null: the class's default
    # The schedule: per-step linear warm-up from warmup_lr, then cosine to min_lr.
    warmup_steps: int = bounded(0, 0)
    warmup_lr: float = bounded(1e-6, 0)
    min_lr: float = bounded(1e-5, 0)
    # A step sees data.batch_size x processes x trainer.accum_steps images; lr_scale adapts lr to that.
    lr_scale: LrScale = LrScale.none
    lr_batch_size: Optional[int] = bounded(None, 1)  # the step batch lr was chosen for; default data.batch_size


@dataclass
class TrainerConfig:
    epochs: int = bounded(12, 1, resumable=True)  # a resumed run may go on for more
    device: str = setting("auto", neutral=True)  # auto | cpu | cuda | cuda:N
    # > 1: one DDP run over this many processes (GPUs) fgvr starts on this machine (runtime/distributed.py);
    # a resumed run may go on with another number, though the step batch (and so the result) changes.
    devices: int = bounded(1, 1, resumable=True)
    precision: Precision = Precision.auto
    accum_steps: int = bounded(1, 1)
    grad_clip: Optional[float] = bounded(None, 0, low_open=True)  # max gradient norm
    label_smoothing: float = bounded(0.0, 0, 1, high_open=True)
    ema_decay: Optional[float] = bounded(None, 0, 1, True, True)  # e.g. 0.9998; evaluation then uses the EMA weights
    # torch.compile the model (both passes); the compile time is logged and in results.
    compile: bool = setting(False, neutral=True)
    # Recompute the backbone's blocks in backward: less memory, one more forward.
    grad_checkpointing: bool = setting(False, neutral=True)
    deterministic: bool = False
    eval_every: int = bounded(1, 1, neutral=True)  # epochs between val evaluations
    log_every: int = bounded(50, 1, neutral=True)  # steps between train log events
    limit_train_batches: Optional[int] = bounded(None, 1)
    limit_eval_batches: Optional[int] = bounded(None, 1, neutral=True)
    # At the end, write <run dir>/backbone.safetensors: the backbone's weights (EMA ones with
    # ema_decay) in timm's format, for a later run's backbone.checkpoint= (+experiment=synth_pretrain).
    export_backbone: bool = setting(False, neutral=True)


@dataclass
class EvalSettings:
    """How val and test are evaluated during and after training."""

    tta: Tta = setting(Tta.none, resumable=True)  # resume=evaluate may evaluate again with another


@dataclass
class LoggerConfig:
    """Where the run's events go besides its run dir: `_target_` (logger=wandb:
    fgvr.runtime.tracker.init_wandb) is called with the run dir and the keys below; null: nowhere."""

    _target_: Optional[str] = None
    project: str = "fgvr"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; null: online iff credentials exist


@dataclass
class PathsConfig:
    cache_dir: str = "${oc.env:FGVR_CACHE_DIR,'~/.cache/fgvr'}"  # generated data sets, decoded caches, weights


@dataclass
class TrainConfig:
    # The run dir's suffix and the W&B name's start; experiment files set their own.
    name: str = setting("${data.name}", neutral=True)
    # NumPy's seeds end at 2**32 - 1; a rank's seed adds to it. Tables average over it, but a resumed
    # run with another seed would be another run.
    seed: int = bounded(0, 0, 2**31 - 1, neutral=True, resumable=False)
    # auto: continue from <run dir>/checkpoints/last.pt if present (a finished run is left as it is) |
    # never | evaluate: evaluate a finished run again (only test figures change) | a run dir or .pt path
    resume: str = setting("auto", neutral=True)
    paths: PathsConfig = setting(factory=PathsConfig, neutral=True)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    logger: LoggerConfig = setting(factory=LoggerConfig, neutral=True)
    selector: Any = None
    texture: Any = None
    head: Any = None
    method: Any = None  # a method with its own forward (TransFG, FFVT, CAL, IELT); none: the model above


@dataclass
class BenchSettings:
    warmup: int = bounded(3, 1)  # untimed steps first (worker start-up, allocator, cudnn autotuning, compilation)
    steps: int = bounded(10, 1)  # timed training steps, on a device-resident batch and then from the train loader
    eval_steps: int = bounded(5, 1)  # timed evaluation batches of each kind
    peak_tflops: Optional[float] = bounded(None, 0, low_open=True)  # dense peak for MFU; null: from the GPU's name
    out: Optional[str] = None  # also write the results as JSON to this file


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class EvalConfig:
    ckpt: str = MISSING  # a run dir or a .pt file
    split: str = "test"  # test | val
    device: str = "auto"
    batch_size: Optional[int] = bounded(None, 1)  # default: the run's data.eval_batch_size
    data_root: Optional[str] = None  # where the data lives now, if it moved
    skip_bad: bool = False  # skip (and count) unreadable images instead of stopping at the first
    out: Optional[str] = None  # the JSON file to write; default: <run dir>/eval_<split>.json
    tta: Optional[Tta] = None  # default: the run's eval.tta


@dataclass
class VizConfig:
    ckpt: str = MISSING  # a run dir or a .pt file
    n: int = bounded(16, 1)  # images to draw, the first n of the split
    split: str = "test"  # test | val
    out: Optional[str] = None  # default: <run dir>/viz
    device: str = "auto"
    data_root: Optional[str] = None  # where the data lives now, if it moved
    skip_bad: bool = False  # skip unreadable images instead of stopping at the first
    cam: str = "none"  # none | gradcam | gradcam++ | finercam (pytorch-grad-cam), beside the method's own map


@dataclass
class PredictConfig:
    ckpt: str = MISSING  # a run dir or a .pt file
    input: str = MISSING  # an image, a folder of images (searched recursively) or a CSV with a path column
    out: Optional[str] = None  # default: predictions.<format> in the current directory
    format: PredictFormat = PredictFormat.csv
    top_k: Optional[int] = bounded(None, 1)  # default: 5, or the class count if fewer
    batch_size: Optional[int] = bounded(None, 1)  # default: the run's data.eval_batch_size
    num_workers: Optional[int] = bounded(None, 0)  # default: the run's data.num_workers
    tta: Optional[Tta] = None  # default: the run's eval.tta
    device: str = "auto"


@dataclass
class ExportConfig:
    ckpt: str = MISSING  # a run dir or a .pt file
    format: ExportFormat = ExportFormat.onnx
    out: Optional[str] = None  # default: <run dir>/export/model.{onnx,ts,pt2}
    batch_size: int = bounded(2, 1)  # of the check against PyTorch (the exported batch size is dynamic)
    tolerance: float = bounded(1e-3, 0, low_open=True)  # the largest |logit difference| the check accepts
    opset: Optional[int] = bounded(None, 7)  # ONNX opset; default: the exporter's


def register_schemas(bench: bool = False) -> None:
    """Store the schemas under the names the configs' defaults lists use. `fgvr bench` composes
    train.yaml itself (bench.yaml adds the bench section), so for it `fgvr_train` is BenchConfig."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fgvr_train", node=BenchConfig if bench else TrainConfig)
    cs.store(name="fgvr_eval", node=EvalConfig)
    cs.store(name="fgvr_viz", node=VizConfig)
    cs.store(name="fgvr_predict", node=PredictConfig)
    cs.store(name="fgvr_export", node=ExportConfig)


def neutral(key: str) -> bool:
    """Whether the dotted train-config key cannot change a run's result, or is the seed tables average
    over; a key outside the schema (a selector's, an older fgvr's) can."""
    return _key_flags(key).get("neutral", False)


def resumable(key: str) -> bool:
    """Whether a resumed run may change the dotted train-config key: a neutral one but the seed, and
    the ones it may go on with otherwise (more epochs, other devices, skipping bad images)."""
    flags = _key_flags(key)
    return flags.get("resumable", flags.get("neutral", False))


@functools.lru_cache(maxsize=None)  # fgvr table asks for every key of every run
def _key_flags(key: str) -> Mapping[str, bool]:
    """The flags of the field a dotted key names, or of the section that holds it. Hydra's own settings,
    in a config that carries them, are neutral."""
    if key.split(".")[0] == "hydra":
        return {"neutral": True}
    schema: type | None = TrainConfig
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(schema)} if schema is not None else {}
        if part not in fields:
            return {}
        if fields[part].metadata.keys() & {"neutral", "resumable"}:
            return fields[part].metadata
        schema = _section(typing.get_type_hints(schema)[part])
    return {}


# What an older fgvr wrote, before optim, logger and backbone named their `_target_` and data.format
# named the data set: optim.name -> (its class, the key it ignored), logger.name -> its target.
_OPTIMIZERS = {"sgd": ("torch.optim.SGD", "betas"), "adamw": ("torch.optim.AdamW", "momentum")}
_LOGGERS = {"none": None, "wandb": "fgvr.runtime.tracker.init_wandb"}
_OWN_FORMATS = ("folder", "csv", "synth")


def upgrade(config: dict) -> dict:
    """A train config an older fgvr stored (a checkpoint's, a run dir's, a W&B run's) in today's keys;
    today's as it is. Options added since stay absent (with_defaults adds them)."""
    optim = config.get("optim")
    if not (isinstance(optim, dict) and optim.get("name") in _OPTIMIZERS):  # today's: no optim.name
        return config
    config = copy.deepcopy(config)
    optim = config["optim"]
    optim["_target_"], ignored = _OPTIMIZERS[optim.pop("name")]
    optim[ignored] = None
    logger, backbone, data = config.get("logger"), config.get("backbone"), config.get("data")
    if isinstance(logger, dict) and logger.get("name") in _LOGGERS:
        logger["_target_"] = _LOGGERS[logger.pop("name")]
    if isinstance(backbone, dict):
        backbone.setdefault("_target_", BackboneConfig._target_)
    if isinstance(data, dict) and "format" in data:
        if data.get("synth") is not None:
            data["format"] = "synth"
        elif data["format"] == "inat":
            data["format"] = "inat2017"
        elif data["format"] == "cub" and data.get("name") == "nabirds":
            data["format"] = "nabirds"
        if data["format"] not in _OWN_FORMATS and data.get("name") != data["format"]:
            data["check_counts"] = False  # totals were looked up by data.name, and this one had none
    return config


def with_defaults(config: dict, schema: type = TrainConfig) -> dict:
    """`config` (an older run's, upgraded) with the keys it lacks at their schema defaults; a section
    that is null stays null."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    out = dict(config)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        section = _section(hints[f.name])
        if f.name not in out and defaults[f.name] != MISSING:
            # An absent section gets its keys' defaults, but not the ones it has none for ("???").
            absent_section = section is not None and isinstance(defaults[f.name], dict)
            out[f.name] = with_defaults({}, section) if absent_section else defaults[f.name]
        elif section is not None and isinstance(out.get(f.name), dict):
            out[f.name] = with_defaults(out[f.name], section)
    return out


def instantiate(group: str, node: Any, *, supplied: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """hydra.utils.instantiate of a group's node, its values as plain containers, with one-line errors:
    a key the target does not take names the ones it does. With `_partial_=True` the keys are checked
    now; `supplied` names the arguments the caller passes later."""
    import functools

    from hydra.utils import get_object
    from hydra.utils import instantiate as hydra_instantiate

    try:
        made = hydra_instantiate(node, _convert_="all", **kwargs)
        if isinstance(made, functools.partial):
            inspect.signature(made.func).bind_partial(*made.args, **made.keywords)
        return made
    except Exception as e:
        cause = e.__cause__ or e
        if isinstance(cause, FgvrError):
            raise cause from None
        target = node.get("_target_")
        if "Error locating target" in str(e):
            raise ConfigError(f"{group}._target_={target}: no such class or function; give its full import path, "
                              "e.g. torch.optim.SGD") from None
        match = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if match:
            options = [k for k in target_arguments(get_object(target)) if k not in {*kwargs, *supplied}]
            raise ConfigError(f"{group}.{match.group(1)}: no such option; {group} takes {', '.join(options)}") from None
        raise ConfigError(f"{group}: {first_line(cause)}") from None


def target_arguments(target: Any) -> dict[str, Any]:
    """The keyword arguments a function or class takes -> their defaults (inspect.Parameter.empty where
    none); a class's include those of the base classes its **kwargs go to."""
    calls = [k.__init__ for k in target.__mro__ if "__init__" in vars(k) and k is not object] \
        if isinstance(target, type) else [target]
    arguments: dict[str, Any] = {}
    for call in calls:
        params = inspect.signature(call).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                arguments.setdefault(p.name, p.default)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return arguments
