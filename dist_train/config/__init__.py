"""The one training config, in sections; each component takes the section it owns.

Every field is a flat command-line flag and a flat YAML key named after it (`--lr` / `lr:`),
whatever its section: users write `lr: 0.01`, not `optim: {lr: 0.01}`. Flag names follow timm's
train.py where it has one (`--opt`, `--sched`, `--smoothing`, `--scale`, `--hflip`, ...) because
users already know them. Precedence is default < `--config FILE.yaml` < flag; the result is
validated once (`validate`) and frozen: the trainer gets a config it cannot change, and debug
runs work on a copy. The resolved config is written flat into every run folder (config.yaml).
"""

from __future__ import annotations

from .parse import build_parser, config_from_args, load_yaml, parse_config, parse_duration, save_config, validate
from .sections import (
    SECTIONS,
    AugmentSection,
    CheckpointSection,
    Config,
    DataSection,
    ModelSection,
    OptimSection,
    RuntimeSection,
    StagesSection,
    TaskSection,
)

__all__ = [
    "SECTIONS", "AugmentSection", "CheckpointSection", "Config", "DataSection", "ModelSection", "OptimSection",
    "RuntimeSection", "StagesSection", "TaskSection", "build_parser", "config_from_args", "load_yaml", "parse_config",
    "parse_duration", "save_config", "validate",
]
