"""The config schema: typed dataclasses Hydra validates every composed config against.

`configs/train.yaml` lists `fgvr_train` first in its defaults, so a wrong key, a value of the
wrong type or an enum value that does not exist fails at composition, before any work starts.
Groups whose keys depend on the chosen class (head, selector, texture) are checked when they
are instantiated instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


def config_dir() -> Path:
    """The configs/ folder: inside the package when installed as a wheel, else the repo's."""
    here = Path(__file__).resolve().parent
    packaged = here / "configs"
    return packaged if packaged.is_dir() else here.parent / "configs"


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
    drop_path_rate: float = 0.0
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm constructor arguments


@dataclass
class AugmentConfig:
    hflip: bool = True
    trivial_augment: bool = False
    random_erasing: float = 0.0  # probability


class SynthKind(Enum):
    discs = "discs"  # data=synth: the class is the grating of the one warm disc, visible at the input size
    parts = "parts"  # data=synth_parts: the class is a fine grating only a full-resolution crop resolves


@dataclass
class SynthConfig:
    """The generated data sets (fgvr/data/synth.py). The `parts` knobs apply to kind=parts only."""

    kind: SynthKind = SynthKind.discs
    num_classes: int = 10
    train_per_class: int = 160
    test_per_class: int = 40
    image_size: int = 96  # side of the stored images (the source resolution)
    distractors: int = 3
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
    img_size: int = 224
    resize_ratio: float = 1.34  # train: square resize to ratio*img_size, then random crop
    batch_size: int = 32
    eval_batch_size: Optional[int] = None  # default: 2 x batch_size
    num_workers: Optional[int] = None  # default: min(8, this process's share of the cores)
    val_fraction: float = 0.1
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
    lr: float = MISSING
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    # A step sees data.batch_size x processes x trainer.accum_steps images; lr_scale adapts lr to that.
    lr_scale: LrScale = LrScale.none
    lr_batch_size: Optional[int] = None  # the step batch lr was chosen for; default data.batch_size


@dataclass
class TrainerConfig:
    epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    devices: int = 1  # processes (GPUs) fgvr starts on this machine for one DDP run; see engine/distributed.py
    precision: Precision = Precision.auto
    accum_steps: int = 1
    grad_clip: Optional[float] = None  # max gradient norm
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None  # e.g. 0.9998; evaluation then uses the EMA weights
    compile: bool = False  # torch.compile the model (both passes); the compile time is logged and in results
    grad_checkpointing: bool = False  # recompute the backbone's blocks in backward: less memory, one more forward
    deterministic: bool = False
    eval_every: int = 1  # epochs between val evaluations
    log_every: int = 50  # steps between train log events
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
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
    seed: int = 0
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
    warmup: int = 3  # untimed steps first (worker start-up, allocator, cudnn autotuning, compilation)
    steps: int = 10  # timed steps of each kind
    eval_steps: int = 5  # timed evaluation batches
    peak_tflops: Optional[float] = None  # the device's dense peak for MFU; null: looked up from the GPU's name
    out: Optional[str] = None  # also write the results as JSON here


@dataclass
class BenchConfig(TrainConfig):
    bench: BenchSettings = field(default_factory=BenchSettings)


@dataclass
class EvalConfig:
    ckpt: str = MISSING  # a run dir or a .pt file
    split: str = "test"  # test | val
    device: str = "auto"
    batch_size: Optional[int] = None
    data_root: Optional[str] = None  # where the data lives now, if it moved


@dataclass
class VizConfig:
    ckpt: str = MISSING  # a run dir or a .pt file
    n: int = 16  # images to draw, the first n of the split
    split: str = "test"  # test | val
    out: Optional[str] = None  # default: <run dir>/viz
    device: str = "auto"
    data_root: Optional[str] = None  # where the data lives now, if it moved


def register_schemas(bench: bool = False) -> None:
    """Store the schemas under the names the configs' defaults lists use. `fgvr bench` composes
    train.yaml itself (bench.yaml adds the bench section), so for it `fgvr_train` is BenchConfig."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fgvr_train", node=BenchConfig if bench else TrainConfig)
    cs.store(name="fgvr_eval", node=EvalConfig)
    cs.store(name="fgvr_viz", node=VizConfig)
