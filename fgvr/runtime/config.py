"""The config schema: typed dataclasses Hydra validates every composed config against.

`configs/train.yaml` lists `fgvr_train` first in its defaults, so a wrong key, a value of the
wrong type or an enum value that does not exist fails at composition, before any work starts.
Groups whose keys depend on the chosen class (head, selector, texture) are checked when they
are instantiated instead.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from fgvr.runtime.errors import ConfigError


def bounded(default: Any, low: float | None = None, high: float | None = None, high_open: bool = False,
            low_open: bool = False) -> Any:
    """A schema field whose value must lie in [low, high] (an end open where asked); None passes."""
    return field(default=default, metadata={"range": (low, high, low_open, high_open)})


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
        section = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)),
                       None)  # a nested section, Optional ones included
        if section is not None:
            check_values(value, section, key + ".")


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
    cub = "cub"  # also NABirds
    cars = "cars"
    aircraft = "aircraft"
    dogs = "dogs"
    flowers = "flowers"
    pets = "pets"
    inat = "inat"
    folder = "folder"
    csv = "csv"


class DataCache(Enum):
    none = "none"  # decode every image file in every epoch
    decoded = "decoded"  # decode and resize once into a memory-mapped uint8 array under paths.cache_dir


class OptimName(Enum):
    sgd = "sgd"
    adamw = "adamw"


class LrScale(Enum):
    none = "none"  # optim.lr as given, whatever the batch of a step
    linear = "linear"  # x (step batch / optim.lr_batch_size)
    sqrt = "sqrt"  # x sqrt(step batch / optim.lr_batch_size)


@dataclass
class BackboneConfig:
    name: str = MISSING  # any timm model name, optionally with a pretrained tag
    pretrained: bool = False
    checkpoint: Optional[str] = None  # local weights file; implies pretrained
    drop_path_rate: float = bounded(0.0, 0, 1, high_open=True)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm constructor arguments


@dataclass
class AugmentConfig:
    hflip: bool = True
    trivial_augment: bool = False
    random_erasing: float = bounded(0.0, 0, 1)  # probability


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
    seed: int = 0
    groups: int = 4  # parts: part colours; classes of a colour differ only in the fine detail
    part_size: float = 0.2  # parts: the part's diameter, as a fraction of the image side
    detail_freq: float = 0.25  # parts: the fine grating's frequency, cycles per pixel of the stored image
    distractor_similarity: float = 0.3  # parts: 0 grey distractors .. 1 as saturated as the part


@dataclass
class DataConfig:
    name: str = MISSING  # name in reports
    format: DataFormat = MISSING  # which reader parses root
    root: Optional[str] = None
    img_size: int = bounded(224, 1)
    resize_ratio: float = bounded(1.34, 1)  # train: square resize to ratio*img_size, then random crop
    batch_size: int = bounded(32, 1)
    eval_batch_size: Optional[int] = bounded(None, 1)  # default: 2 x batch_size
    num_workers: Optional[int] = bounded(None, 0)  # default: min(8, this process's share of the cores)
    val_fraction: float = bounded(0.1, 0, 1, high_open=True)
    skip_bad: bool = False
    # Before training, compare the split sizes with the data set's official totals (fgvr/data/catalog.py),
    # so that a wrong or half-extracted data.root fails in seconds; false to train on a subset.
    check_counts: bool = True
    cache: DataCache = DataCache.none
    level: Optional[str] = None  # which labels, where a data set has levels (aircraft: variant, family, manufacturer)
    train_csv: str = "train.csv"
    test_csv: str = "test.csv"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synth: Optional[SynthConfig] = None


@dataclass
class OptimConfig:
    name: OptimName = MISSING
    lr: float = bounded(MISSING, 0, low_open=True)
    weight_decay: float = bounded(0.0, 0)
    momentum: float = bounded(0.9, 0, 1)  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    warmup_steps: int = bounded(0, 0)
    warmup_lr: float = bounded(1e-6, 0)
    min_lr: float = bounded(1e-5, 0)
    # A step sees data.batch_size x processes x trainer.accum_steps images; lr_scale adapts lr to that.
    lr_scale: LrScale = LrScale.none
    lr_batch_size: Optional[int] = bounded(None, 1)  # the step batch lr was chosen for; default data.batch_size


@dataclass
class TrainerConfig:
    epochs: int = bounded(12, 1)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: int = bounded(1, 1)  # processes (GPUs) fgvr starts here for one DDP run; see engine/distributed.py
    precision: Precision = Precision.auto
    accum_steps: int = bounded(1, 1)
    grad_clip: Optional[float] = bounded(None, 0, low_open=True)  # max gradient norm
    label_smoothing: float = bounded(0.0, 0, 1, high_open=True)
    ema_decay: Optional[float] = bounded(None, 0, 1, True, True)  # e.g. 0.9998; evaluation then uses the EMA weights
    compile: bool = False  # torch.compile the model (both passes); the compile time is logged and in results
    grad_checkpointing: bool = False  # recompute the backbone's blocks in backward: less memory, one more forward
    deterministic: bool = False
    eval_every: int = bounded(1, 1)  # epochs between val evaluations
    log_every: int = bounded(50, 1)  # steps between train log events
    limit_train_batches: Optional[int] = bounded(None, 1)
    limit_eval_batches: Optional[int] = bounded(None, 1)
    # At the end, write <run dir>/backbone.safetensors: the backbone's weights (EMA ones with
    # ema_decay) in timm's format, for a later run's backbone.checkpoint= (+experiment=synth_pretrain).
    export_backbone: bool = False


@dataclass
class LoggerConfig:
    name: str = "none"
    project: str = "fgvr"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; default: online iff credentials exist


@dataclass
class PathsConfig:
    cache_dir: str = MISSING  # generated data sets


@dataclass
class TrainConfig:
    name: str = MISSING
    seed: int = bounded(0, 0, 2**31 - 1)  # NumPy's seeds end at 2**32 - 1; a rank's seed adds to it
    resume: str = "auto"  # auto | never | /path/to/checkpoint.pt
    paths: PathsConfig = field(default_factory=PathsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    selector: Any = None
    texture: Any = None
    head: Any = None


@dataclass
class BenchSettings:
    warmup: int = bounded(3, 1)  # untimed steps first (worker start-up, allocator, cudnn autotuning, compilation)
    steps: int = bounded(10, 1)  # timed steps of each kind
    eval_steps: int = bounded(5, 1)  # timed evaluation batches
    peak_tflops: Optional[float] = bounded(None, 0, low_open=True)  # dense peak for MFU; null: from the GPU's name
    out: Optional[str] = None  # also write the results as JSON here


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class EvalConfig:
    ckpt: str = MISSING  # a run dir or a .pt file
    split: str = "test"  # test | val
    device: str = "auto"
    batch_size: Optional[int] = bounded(None, 1)
    data_root: Optional[str] = None  # where the data lives now, if it moved
    skip_bad: bool = False  # skip (and count) unreadable images instead of stopping at the first
    out: Optional[str] = None  # the JSON file to write; default: <run dir>/eval_<split>.json


@dataclass
class VizConfig:
    ckpt: str = MISSING  # a run dir or a .pt file
    n: int = bounded(16, 1)  # images to draw, the first n of the split
    split: str = "test"  # test | val
    out: Optional[str] = None  # default: <run dir>/viz
    device: str = "auto"
    data_root: Optional[str] = None  # where the data lives now, if it moved
    skip_bad: bool = False  # skip unreadable images instead of stopping at the first


def register_schemas(bench: bool = False) -> None:
    """Store the schemas under the names the configs' defaults lists use. `fgvr bench` composes
    train.yaml itself (bench.yaml adds the bench section), so for it `fgvr_train` is BenchConfig."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fgvr_train", node=BenchConfig if bench else TrainConfig)
    cs.store(name="fgvr_eval", node=EvalConfig)
    cs.store(name="fgvr_viz", node=VizConfig)
