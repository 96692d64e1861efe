"""The one training config: a dataclass whose fields are the CLI flags and the YAML keys.

Precedence is dataclass default < `--config FILE.yaml` < command-line flag. Flag names follow
timm's train.py where it has one (`--opt`, `--sched`, `--smoothing`, `--scale`, `--hflip`, ...)
because users already know them. The resolved config is written into every run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import ArgParser, UserError, atomic_write_text


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field that carries its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # data and output
    data: str | None = _f(None, "shard set folder or URL written by `python -m dist_train.shard`")
    output: str | None = _f(None, "run folder (checkpoints/, best/, metrics.jsonl, config.yaml)")
    train_split: str = _f("train", "split to train on")
    val_split: str | None = _f("validation", "split to evaluate on ('none' to skip evaluation)")
    # model
    model: str = _f("resnet18", "any timm model name")
    pretrained: bool = _f(False, "load timm's pretrained weights (through the HF hub cache)")
    pretrained_path: str | None = _f(None, "local weights: .safetensors, a state dict, or a folder (wins over --pretrained)")
    head: str = _f("single", "'single' (one N-class head) or 'multi' (mask/gender/age heads; mask data)")
    img_size: int = _f(224, "input image size (square)")
    drop: float = _f(0.0, "dropout before the classifier")
    drop_path: float | None = _f(None, "stochastic depth rate")
    channels_last: bool = _f(False, "use channels_last memory format")
    compile: bool = _f(False, "torch.compile the model (before DDP wraps it)")
    # optimisation
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
    mixed_precision: str | None = _f(None, "no|bf16|fp16 (default: Accelerate's config)")
    # loss and labels
    smoothing: float = _f(0.1, "label smoothing")
    loss: str = _f("ce", "ce|focal|f1")
    class_weights: str | None = _f(None, "'auto': inverse class frequency from _info.json")
    age_bins: str = _f("30,60", "mask data: age-group cuts used for training labels")
    relabel: str | None = _f(None, "mask data: CSV of label corrections applied at load time")
    # augmentation
    scale: list = _f([0.5, 1.0], "RandomResizedCrop scale range", nargs=2, type=float)
    ratio: list = _f([0.75, 1.3333333333333333], "RandomResizedCrop aspect range", nargs=2, type=float)
    hflip: float = _f(0.5, "horizontal flip probability")
    aa: str | None = _f(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    reprob: float = _f(0.0, "RandomErasing probability (on the device)")
    crop_pct: float | None = _f(None, "eval crop fraction (default: the model's)")
    crop: str = _f("random", "train crop: random (RandomResizedCrop) or center")
    mixup: float = _f(0.0, "mixup alpha (timm Mixup)")
    cutmix: float = _f(0.0, "cutmix alpha (timm Mixup)")
    # staged unfreezing
    unfreeze: Any = _f(None, "stages from the head down, e.g. head:1,last2:2,all (default: all)")
    layer_decay: float | None = _f(None, "LR decay per layer group away from the head")
    unfreeze_warmup: int = _f(0, "steps over which a newly trainable group warms up from LR 0")
    train_bn: bool = _f(False, "keep BatchNorm statistics moving in frozen groups")
    # runtime
    workers: int = _f(4, "data loader worker processes per rank")
    seed: int = _f(42, "random seed (shared by all ranks for the shard order)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (saves a checkpoint)")
    eval_every: int | None = _f(None, "evaluate every N optimizer steps (always at epoch end)")
    checkpoint_every: int | None = _f(None, "checkpoint every N optimizer steps (always at epoch end)")
    keep_checkpoints: int = _f(3, "keep the newest K checkpoints")
    resume: str = _f("none", "auto (newest checkpoint in --output), a checkpoint PATH, or none")
    log_every: int = _f(10, "update the progress bar every N steps")
    dist_timeout: int = _f(600, "seconds a rank waits for the others (a dead rank ends the run after this)")
    max_bad_fraction: float = _f(0.01, "stop when more than this fraction of an epoch's samples is undecodable")
    max_bad_steps: int = _f(5, "stop after this many non-finite losses in a row (each such step is skipped)")
    secure: bool = _f(False, "refuse pipe: data URLs (webdataset secure mode for remote shards)")
    gpu_decode: bool = _f(False, "workers only read bytes; JPEG decode and crop/flip run on the GPU")
    # debugging
    debug: bool = _f(False, "one process, workers 0, fp32, a few batches, anomaly detection")
    debug_steps: int = _f(5, "train and val batches in --debug")
    overfit_batches: int = _f(0, "train on N fixed batches and report whether the loss falls")

    def validate(self) -> "Config":
        """Reject values no run could use, with one line each."""
        if not self.data:
            raise UserError("--data is required: a shard folder written by `python -m dist_train.shard`")
        for name in ("img_size", "batch_size", "epochs", "grad_accum_steps", "keep_checkpoints", "log_every",
                     "dist_timeout", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a positive integer")
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise UserError(f"--{name.replace('_', '-')} {v}: expected a positive integer")
        if not 0 <= self.max_bad_fraction <= 1:
            raise UserError(f"--max-bad-fraction {self.max_bad_fraction}: expected 0..1")
        if self.secure and str(self.data).startswith("pipe:"):
            raise UserError(f"--data {self.data}: pipe: URLs run shell commands and are refused with --secure")
        if self.workers < 0:
            raise UserError(f"--workers {self.workers}: expected 0 or more")
        if self.lr <= 0:
            raise UserError(f"--lr {self.lr}: expected a positive number")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise UserError(f"--mixed-precision {self.mixed_precision}: expected no, bf16 or fp16")
        if self.head not in ("single", "multi"):
            raise UserError(f"--head {self.head}: expected single or multi")
        if self.loss not in ("ce", "focal", "f1"):
            raise UserError(f"--loss {self.loss}: expected ce, focal or f1")
        if self.class_weights not in (None, "auto"):
            raise UserError(f"--class-weights {self.class_weights}: expected auto")
        if self.crop not in ("random", "center"):
            raise UserError(f"--crop {self.crop}: expected random or center")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise UserError(f"--scale {self.scale[0]} {self.scale[1]}: expected 0 < MIN <= MAX <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise UserError(f"--ratio {self.ratio[0]} {self.ratio[1]}: expected 0 < MIN <= MAX")
        if not 0 <= self.hflip <= 1 or not 0 <= self.reprob <= 1:
            raise UserError("--hflip and --reprob are probabilities: expected 0..1")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise UserError(f"--crop-pct {self.crop_pct}: expected 0 < x <= 1")
        if self.overfit_batches < 0 or self.debug_steps <= 0:
            raise UserError("--overfit-batches >= 0 and --debug-steps > 0 expected")
        if self.resume not in ("auto", "none") and not Path(self.resume).is_dir():
            raise UserError(f"--resume {self.resume}: expected auto, none or a checkpoint folder")
        if self.val_split in ("none", ""):
            self.val_split = None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in fields(Config)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _none_or(typ: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else typ(text)

    parse.__name__ = typ.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """Every Config field becomes a flag; defaults are left unset so YAML can fill them."""
    p = ArgParser(
        prog="dist_train/run.py",
        description="Train a timm model on dist_train shards (DDP through `accelerate launch`).",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="YAML file of config values; flags override it")
    for f in fields(Config):
        help_text = f"{f.metadata['help']} (default: {f.default if f.default is not dataclasses.MISSING else f.default_factory()})"
        kw: dict[str, Any] = {"help": help_text, "dest": f.name}
        if f.type in ("bool",) or f.type is bool:
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if "nargs" in f.metadata:
            kw.update(nargs=f.metadata["nargs"], type=f.metadata["type"], metavar=("MIN", "MAX"))
        elif f.name == "unfreeze":
            kw.update(type=str, metavar="STAGES")
        else:
            base = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            kw.update(type=_none_or(base) if "None" in str(f.type) else base)
        p.add_argument(_flag(f.name), **kw)
    return p


def load_yaml(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"--config {path}:{where} not valid YAML") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of config keys")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise UserError(f"--config {path}: unknown key '{key}' (see dist_train/run.py --help)")
        out[name] = value
    return out


def parse_config(argv: Sequence[str] | None = None) -> Config:
    """defaults < YAML < flags, then validated."""
    args = vars(build_parser().parse_args(argv))
    values = load_yaml(args.pop("config")) if "config" in args else {}
    values.update(args)
    try:
        cfg = Config(**values)
    except TypeError as e:
        raise UserError(f"config: {e}") from None
    for name in ("scale", "ratio"):
        v = getattr(cfg, name)
        if not (isinstance(v, (list, tuple)) and len(v) == 2):
            raise UserError(f"{name}: expected two numbers, got {v!r}")
        setattr(cfg, name, [float(x) for x in v])
    return cfg.validate()


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
