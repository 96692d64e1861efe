"""Staged unfreezing, model side: the schedule, layer groups, trainable sets, param groups.

Layer groups are timm's coarse `group_matcher` groups (stem, blocks or stages, head; the head
being the classifier alone, see `layer_groups`), so one
schedule such as `head:1,last2:2,all` means the same thing for any timm model. Nothing here
knows about DDP or Accelerate: the trainer sets `requires_grad` with `apply_trainable`,
rebuilds its DDP wrapper, and feeds `param_groups` to the optimizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from timm.models import group_parameters

from dist_train.errors import UserError

_SPEC = re.compile(r"^(head|all|last([1-9][0-9]*))$")


@dataclass(frozen=True)
class Stage:
    """Train `groups` ('head', 'lastN' or 'all') for `epochs` (None: the remaining epochs)."""

    groups: str
    epochs: int | None = None


def _rank(groups: str) -> float:
    """How much of the model a spec trains: head 0 < last1 < last2 < ... < all."""
    m = _SPEC.match(groups)
    return 0 if groups == "head" else float("inf") if groups == "all" else int(m.group(2))  # type: ignore[union-attr]


def _stage(groups: Any, epochs: Any, where: str) -> Stage:
    groups = str(groups).strip().lower()
    if not _SPEC.match(groups):
        raise UserError(f"--unfreeze {where}: groups {groups!r}; expected 'head', 'lastN' (N >= 1) or 'all'")
    if epochs is not None:
        try:
            epochs = int(str(epochs).strip())
        except ValueError:
            raise UserError(f"--unfreeze {where}: epochs {epochs!r} is not a whole number") from None
        if epochs < 1:
            raise UserError(f"--unfreeze {where}: epochs must be >= 1, got {epochs}")
    return Stage(groups, epochs)


def parse_schedule(spec: str | list | None) -> list[Stage]:
    """'head:1,last2:2,all' or [{train: head, epochs: 1}, ...] -> stages; None/'' -> [all].

    Each stage must train more than the one before (the optimizer only grows) and every stage
    but the last needs its epoch count.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return [Stage("all")]
    stages: list[Stage] = []
    if isinstance(spec, str):
        for i, item in enumerate(spec.split(",")):
            groups, sep, epochs = item.strip().partition(":")
            if sep and not epochs.strip():
                raise UserError(f"--unfreeze stage {i + 1} '{item.strip()}': missing epochs after ':'")
            stages.append(_stage(groups, epochs if sep else None, f"stage {i + 1} '{item.strip()}'"))
    elif isinstance(spec, list):
        for i, item in enumerate(spec):
            if not isinstance(item, dict) or "train" not in item or set(item) - {"train", "epochs"}:
                raise UserError(f"unfreeze stage {i + 1}: {item!r}; expected a mapping with 'train' and "
                                f"optionally 'epochs'")
            stages.append(_stage(item["train"], item.get("epochs"), f"stage {i + 1}"))
    else:
        raise UserError(f"unfreeze: {spec!r}; expected a string like 'head:1,all' or a list of {{train, epochs}}")
    if not stages:
        raise UserError("unfreeze: empty schedule")
    for i, s in enumerate(stages[:-1]):
        if s.epochs is None:
            raise UserError(f"--unfreeze stage {i + 1} '{s.groups}': only the last stage may leave out its "
                            f"epochs (write it as '{s.groups}:EPOCHS')")
    for a, b in zip(stages, stages[1:]):
        if _rank(b.groups) <= _rank(a.groups):
            raise UserError(f"--unfreeze: stage '{b.groups}' after '{a.groups}' does not unfreeze more; stages go "
                            f"from the head down (e.g. head:1,last2:2,all)")
    return stages


def stage_epochs(stages: list[Stage], total_epochs: int) -> list[int]:
    """Epochs of each stage; the last takes what is left. UserError if they do not fit."""
    fixed = sum(s.epochs for s in stages[:-1])  # type: ignore[misc]
    last = stages[-1].epochs
    if last is None:
        if fixed >= total_epochs:
            raise UserError(f"--unfreeze: the stages before the last take {fixed} epochs, leaving none of "
                            f"--epochs {total_epochs} for '{stages[-1].groups}'")
        last = total_epochs - fixed
    elif fixed + last != total_epochs:
        raise UserError(f"--unfreeze: stages add up to {fixed + last} epochs but --epochs is {total_epochs}; "
                        f"leave the last stage's count off to let it take the rest")
    return [s.epochs for s in stages[:-1]] + [last]  # type: ignore[misc]


def stage_for_epoch(stages: list[Stage], epoch: int, total_epochs: int) -> int:
    """Index of the stage that trains 0-based `epoch` (epochs past the end stay in the last)."""
    end = 0
    for i, n in enumerate(stage_epochs(stages, total_epochs)):
        end += n
        if epoch < end:
            return i
    return len(stages) - 1


def stage_start_epoch(stages: list[Stage], index: int, total_epochs: int) -> int:
    """First (0-based) epoch of stage `index`."""
    return sum(stage_epochs(stages, total_epochs)[:index])


# ----------------------------------------------------------------------------- groups
def layer_groups(model: torch.nn.Module) -> list[list[str]]:
    """Parameter names by timm's coarse layer groups, stem first, the classifier alone last.

    timm leaves what its matcher names in no group (the layers between the last block and the
    classifier: MobileNetV3's conv_head, ConvNeXt's head norm, Swin's final norm, FastViT's
    final_conv) in one last group with the classifier. Those layers come with the pretrained
    weights, so they join the last block group and `head` is the classifier (`get_classifier()`,
    the one part a new class count replaces) alone: what `--unfreeze head` promises.
    """
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        raise UserError(f"{type(model).__name__} has no timm group_matcher; staged unfreezing needs a timm model")
    spec = matcher(coarse=True)
    grouped = group_parameters(model, spec)
    groups = [list(grouped[k]) for k in sorted(grouped)]
    clf = classifier_names(model)
    if not clf and getattr(model, "num_classes", None) != 0:
        return groups  # no classifier to tell apart from the rest of the head
    pre = _unmatched(spec, {n for g in groups for n in g}) - clf
    body = [kept for g in groups if (kept := [n for n in g if n not in pre and n not in clf])]
    if not body:
        return groups
    body[-1] += [n for g in groups for n in g if n in pre]
    return body + ([[n for g in groups for n in g if n in clf]] if clf else [])


def classifier_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters of timm's `get_classifier()` (a module, or a tuple of them for
    distilled models such as DeiT and LeViT); empty for a headless model."""
    get = getattr(model, "get_classifier", None)
    clf = get() if get is not None else None
    mods = clf if isinstance(clf, (tuple, list, torch.nn.ModuleList)) else (clf,)
    ids = {id(p) for m in mods if isinstance(m, torch.nn.Module) for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _unmatched(spec: Any, names: set[str]) -> set[str]:
    """The names none of a timm dict matcher's patterns match (timm's `group_with_matcher` puts them
    last); none for a callable matcher."""
    if not isinstance(spec, dict):
        return set()
    pats = [re.compile(m if isinstance(m, str) else m[0]) for v in spec.values() if v is not None
            for m in ((v,) if isinstance(v, str) else v)]
    return {n for n in names if not any(p.match(n) for p in pats)}


def _resolve(groups: list[list[str]], spec: str) -> set[str]:
    m = _SPEC.match(spec)
    if not m:
        raise UserError(f"unfreeze groups {spec!r}; expected 'head', 'lastN' or 'all'")
    n = 0 if spec == "head" else len(groups) if spec == "all" else int(m.group(2))
    return {name for g in groups[-(n + 1):] for name in g}


def _running_stat_modules(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    """BatchNorm-like modules: those whose running statistics move in train mode."""
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "running_mean", None), torch.Tensor):
            yield name, mod


def trainable_names(model: torch.nn.Module, spec: str) -> set[str]:
    """Parameter names `spec` trains ('head' = last group, 'lastN' = head + N groups before, 'all')."""
    return _resolve(layer_groups(model), spec)


def apply_trainable(model: torch.nn.Module, names: set[str], train_bn: bool = False) -> None:
    """requires_grad = True exactly for `names` (plus BatchNorm affine params with train_bn)."""
    known = {n for n, _ in model.named_parameters()}
    if not names <= known:
        raise ValueError(f"unknown parameter names: {sorted(names - known)[:3]}")
    bn = _bn_param_names(model) if train_bn else set()
    for n, p in model.named_parameters():
        p.requires_grad_(n in names or n in bn)


def _bn_param_names(model: torch.nn.Module) -> set[str]:
    return {f"{prefix}.{n}" if prefix else n
            for prefix, mod in _running_stat_modules(model) for n, _ in mod.named_parameters(recurse=False)}


def freeze_bn(model: torch.nn.Module, names: set[str], train_bn: bool = False) -> int:
    """Call after every model.train(): BatchNorm-like layers outside `names` go to eval mode so
    their running statistics stay as loaded (unless train_bn). Returns how many were frozen.

    A layer counts as trainable when any of its own parameters is in `names`; one without
    parameters (affine=False) only when every parameter of the model is.
    """
    if train_bn:
        return 0
    everything = names >= {n for n, _ in model.named_parameters()}
    frozen = 0
    for prefix, mod in _running_stat_modules(model):
        own = [f"{prefix}.{n}" if prefix else n for n, _ in mod.named_parameters(recurse=False)]
        if not (any(n in names for n in own) if own else everything):
            mod.eval()
            frozen += 1
    return frozen


def param_groups(model: torch.nn.Module, names: set[str], *, weight_decay: float,
                 layer_decay: float | None = None) -> list[dict]:
    """Optimizer param groups for exactly `names`, one or two per layer group.

    No weight decay for 1-D params, biases and the model's no_weight_decay() names (as timm's
    `param_groups_weight_decay`); with layer_decay, lr_scale = layer_decay ** (distance of the
    layer group from the head), as timm's `param_groups_layer_decay` (timm schedulers multiply
    each group's LR by its lr_scale). Each group carries group_name, lr_scale and param_names
    (torch's own key for named params, so names survive optimizer state_dict round trips).
    """
    groups = layer_groups(model)
    layer_of = {n: i for i, g in enumerate(groups) for n in g}
    nwd_fn = getattr(model, "no_weight_decay", None)
    no_wd = set(nwd_fn()) if nwd_fn is not None else set()
    params = dict(model.named_parameters())
    unknown = names - params.keys()
    if unknown:
        raise ValueError(f"unknown parameter names: {sorted(unknown)[:3]}")
    last = len(groups) - 1
    out: dict[tuple[int, bool], dict] = {}
    for n, p in params.items():  # model order keeps the groups deterministic across ranks
        if n not in names:
            continue
        lid = layer_of[n]
        decay = not (p.ndim <= 1 or n.endswith(".bias") or n in no_wd)
        key = (lid, decay)
        if key not in out:
            out[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": float(layer_decay ** (last - lid)) if layer_decay is not None else 1.0,
                "group_name": f"layer_{lid}_{'decay' if decay else 'no_decay'}",
            }
        out[key]["params"].append(p)
        out[key]["param_names"].append(n)
    return [out[k] for k in sorted(out)]


def count_params(model: torch.nn.Module, names: set[str] | None = None) -> int:
    """Number of parameter elements, of all parameters or of `names` (also through a DDP or
    torch.compile wrapper, whose parameter names carry a prefix)."""
    return sum(p.numel() for n, p in model.named_parameters() if names is None or strip_wrappers(n) in names)


def strip_wrappers(name: str) -> str:
    """A parameter name without DDP (`module.`) / torch.compile (`_orig_mod.`) prefixes."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name
