"""The config's sections: frozen dataclasses whose fields are the flags (with their --help)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from dist_train.errors import UserError
from dist_train.system import default_workers


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that carries its --help text (and argparse extras: nargs, type)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class DataSection:
    data: str | None = _f(None, "shard set folder or URL written by `python -m dist_train.shard`")
    train_split: str = _f("train", "split to train on")
    val_split: str | None = _f("validation", "split to evaluate on ('none' to skip evaluation)")
    fold: str | None = _f(None, "shard sets with --folds K: hold fold k (0..K-1) of the training split out as "
                                "validation, or 'all' to train on every fold without validation")
    workers: int | None = _f(None, "data loader worker processes per rank (default: the cores available per "
                                   "process less one, at most 8; 0 loads in the process itself)")
    sampler: str = _f("none", "balanced (equal class shares), sqrt (shares ~ sqrt of class size) or none")
    gpu_decode: bool = _f(False, "workers only read bytes; JPEG decode and crop/flip run on the GPU")
    secure: bool = _f(False, "refuse pipe: data URLs (webdataset secure mode for remote shards)")

    def __post_init__(self) -> None:
        if self.workers is None:  # resolved here, so config.yaml records the number used
            object.__setattr__(self, "workers", default_workers())


@dataclass(frozen=True)
class ModelSection:
    model: str = _f("resnet18", "any timm model name")
    pretrained: bool = _f(False, "load timm's pretrained weights (through the HF hub cache)")
    pretrained_path: str | None = _f(None, "local weights: .safetensors, a state dict, or a folder (wins over --pretrained)")
    img_size: int = _f(224, "input image size (square)")
    drop: float = _f(0.0, "dropout before the classifier")
    drop_path: float | None = _f(None, "stochastic depth rate")
    channels_last: bool = _f(False, "use channels_last memory format")
    compile: bool = _f(False, "torch.compile the model (before DDP wraps it)")
    grad_checkpointing: bool = _f(False, "recompute activations in the backward instead of keeping them (timm's "
                                  "set_grad_checkpointing): less memory, one more forward per step")
    model_ema: bool = _f(False, "keep an exponential moving average of the weights (timm ModelEmaV3), evaluated too")
    model_ema_decay: float = _f(0.9998, "EMA decay per optimizer step")
    model_ema_warmup: bool = _f(False, "ramp the EMA decay up from 0 (timm's warm-up) instead of starting at it")


@dataclass(frozen=True)
class TaskSection:
    """Loss and labels. Fields marked task_option exist for some tasks only (tasks.base.Task.check)."""

    head: str = _f("single", "'single' (one N-class head) or a head the data's task offers (mask data: 'multi')",
                   task_option=True)
    loss: str = _f("ce", "ce|focal|f1")
    smoothing: float = _f(0.1, "label smoothing")
    class_weights: str | None = _f(None, "'auto': inverse class frequency from _info.json")
    age_bins: str = _f("30,60", "mask data: age-group cuts used for training labels", task_option=True)
    relabel: str | None = _f(None, "mask data: CSV of label corrections applied at load time", task_option=True)


@dataclass(frozen=True)
class AugmentSection:
    scale: list = _f([0.5, 1.0], "RandomResizedCrop scale range", nargs=2, type=float)
    ratio: list = _f([0.75, 1.3333333333333333], "RandomResizedCrop aspect range", nargs=2, type=float)
    hflip: float = _f(0.5, "horizontal flip probability")
    vflip: float = _f(0.0, "vertical flip probability")
    color_jitter: float = _f(0.0, "colour jitter: brightness, contrast and saturation factors from [1-x, 1+x] "
                             "(timm's; 0.4 is its default), not with --aa")
    aa: str | None = _f(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    reprob: float = _f(0.0, "RandomErasing probability (on the device)")
    crop_pct: float | None = _f(None, "eval crop fraction (default: the model's)")
    crop: str = _f("random", "train crop: random (RandomResizedCrop) or center")
    mixup: float = _f(0.0, "mixup alpha (timm Mixup)")
    cutmix: float = _f(0.0, "cutmix alpha (timm Mixup)")
    val_tta: str = _f("none", "test-time augmentation in validation, probabilities averaged over the views: none, "
                      "or a comma list of hflip, five-crop, scales:S1/S2/... (as predict's --tta)")


@dataclass(frozen=True)
class OptimSection:
    epochs: int = _f(10, "number of epochs")
    batch_size: int = _f(64, "batch size per process")
    lr: float = _f(1e-3, "base learning rate")
    weight_decay: float = _f(0.05, "weight decay")
    opt: str = _f("adamw", "optimizer, any timm create_optimizer_v2 name")
    momentum: float = _f(0.9, "SGD momentum")
    sched: str = _f("cosine", "LR schedule, any timm create_scheduler_v2 name, stepped per update")
    warmup_epochs: float = _f(0.0, "linear warmup length in epochs")
    warmup_lr: float = _f(1e-5, "LR at the start of warmup")
    min_lr: float = _f(0.0, "lower LR bound of the schedule")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step")
    clip_grad: float | None = _f(None, "clip gradient norm to this value")


@dataclass(frozen=True)
class StagesSection:
    unfreeze: Any = _f(None, "stages from the head down, e.g. head:1,last2:2,all (default: all)")
    layer_decay: float | None = _f(None, "LR decay per layer group away from the head")
    unfreeze_warmup: int = _f(0, "steps over which a newly trainable group warms up from LR 0")
    train_bn: bool = _f(False, "keep BatchNorm statistics moving in frozen groups")


@dataclass(frozen=True)
class CheckpointSection:
    output: str | None = _f(None, "run folder (checkpoints/, best/, metrics.jsonl, config.yaml)")
    checkpoint_every: int | None = _f(None, "checkpoint every N optimizer steps (always at epoch end)")
    keep_checkpoints: int = _f(3, "keep the newest K checkpoints")
    resume: str = _f("none", "auto (newest checkpoint in --output), a checkpoint PATH, or none")


@dataclass(frozen=True)
class RuntimeSection:
    seed: int = _f(42, "random seed (shared by all ranks for the shard order)")
    mixed_precision: str | None = _f(None, "no|bf16|fp16 (default: Accelerate's config)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (saves a checkpoint)")
    eval_every: int | None = _f(None, "evaluate every N optimizer steps (always at epoch end)")
    log_every: int = _f(10, "update the progress bar, and log the train loss and LR to the trackers, every N steps")
    log_samples: str | None = _f(None, "append one JSON line per optimizer step and rank: epoch, step, rank, lr, keys")
    log_with: str = _f("tensorboard", "experiment trackers, comma separated: any of Accelerate's (tensorboard, wandb, "
                       "mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio), or none")
    experiment: str = _f("dist_train", "the trackers' experiment: W&B project, MLflow experiment, folder under RUN/tb")
    run_name: str | None = _f(None, "the trackers' run name (default: the --output folder's name)")
    dist_timeout: int = _f(600, "seconds a rank waits for the others (a dead rank ends the run after this)")
    max_bad_fraction: float = _f(0.01, "stop when more than this fraction of an epoch's samples is undecodable")
    max_bad_steps: int = _f(5, "stop after this many non-finite losses in a row (each such step is skipped)")
    patience: int | None = _f(None, "stop after N evaluations without a better val macro F1 (with a checkpoint)")
    time_limit: str | None = _f(None, "stop cleanly before this much time has passed (90s, 45m, 2h, 1h30m), with a "
                                      "checkpoint that --resume auto continues")
    plots: bool = _f(True, "draw confusion.png at each evaluation (also sent to the trackers) and report.png at the "
                           "end; --no-plots writes the same CSV/JSON files without pictures (sweeps, tests)")
    debug: bool = _f(False, "a smoke run: one process, workers 0, fp32, anomaly detection, --debug-steps train "
                            "batches then one validation of at most as many")
    debug_steps: int = _f(5, "train and val batches in --debug")
    overfit_batches: int = _f(0, "train on N fixed batches and report whether the loss falls")


SECTIONS: dict[str, type] = {
    "data": DataSection, "model": ModelSection, "task": TaskSection, "augment": AugmentSection,
    "optim": OptimSection, "stages": StagesSection, "checkpoint": CheckpointSection, "runtime": RuntimeSection,
}
# flat name -> its section's name
SECTION_OF: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in fields(cls)}


FLOAT_FIELDS: dict[str, str] = {f.name: str(f.type) for cls in SECTIONS.values() for f in fields(cls)
                                 if "float" in str(f.type)}


def _normalise(values: dict) -> dict:
    """YAML gives lists and strings where flags give typed values: bring them to one form."""
    values = dict(values)
    for name in ("scale", "ratio"):
        if name in values:
            v = values[name]
            if not (isinstance(v, (list, tuple)) and len(v) == 2):
                raise UserError(f"{name}: expected two numbers, got {v!r}")
            try:
                values[name] = [float(x) for x in v]
            except (TypeError, ValueError):
                raise UserError(f"{name}: expected two numbers, got {v!r}") from None
    for name, value in values.items():  # YAML reads `lr: 1e-3` (no dot) as a string
        if isinstance(value, str) and "float" in FLOAT_FIELDS.get(name, ""):
            try:
                values[name] = float(value)
            except ValueError:
                pass  # left for validate to name
    if values.get("val_split") in ("none", ""):
        values["val_split"] = None
    if isinstance(values.get("fold"), int) and not isinstance(values["fold"], bool):  # YAML 2, the flag "2"
        values["fold"] = str(values["fold"])
    return values


@dataclass(frozen=True)
class Config:
    """All sections. Build with `Config.from_flat({...})`; read as `cfg.optim.lr`."""

    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    optim: OptimSection = field(default_factory=OptimSection)
    stages: StagesSection = field(default_factory=StagesSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "Config":
        """Flat field names (flags / YAML keys) -> sections; an unknown name is a UserError."""
        unknown = sorted(set(values) - SECTION_OF.keys())
        if unknown:
            raise UserError(f"config: unknown key(s) {', '.join(unknown)} (see dist_train/run.py --help)")
        per: dict[str, dict] = {s: {} for s in SECTIONS}
        for name, value in _normalise(values).items():
            per[SECTION_OF[name]][name] = value
        return cls(**{s: SECTIONS[s](**kw) for s, kw in per.items()})

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name, section by section (what config.yaml holds)."""
        return {f.name: getattr(getattr(self, s), f.name) for s, cls in SECTIONS.items() for f in fields(cls)}

    def replace(self, **changes: Any) -> "Config":
        """A copy with some flat fields changed; this config stays as it is."""
        return Config.from_flat({**self.flat(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
