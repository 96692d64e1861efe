"""Staged unfreezing through the real trainer: DDP stays in sync across stage changes, frozen
weights stay bit-identical, the optimizer only holds trainable state, resume mid-stage, layer
decay and unfreeze warmup, four model families, and the launch/configs/ recipes."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, launch, run_main

BASE = ["--img-size", "32", "--seed", "0", "--warmup-epochs", "0", "--no-plots"]
RESNET = ["--model", "test_resnet", "--batch-size", "8", "--lr", "0.01", *BASE]
RECIPES = ROOT / "launch" / "configs"
# recipe -> the tiny timm model of the same family that stands in for it on CPU
FAMILY_RECIPES = {
    "test_resnet": "resnet18_feature_extraction.yaml",
    "test_efficientnet": "efficientnet_b0_staged.yaml",
    "test_convnext": "convnext_tiny.yaml",
    "test_vit": "vit_small_layer_decay.yaml",
}


def run_py(args: list[str]) -> subprocess.CompletedProcess:
    """dist_train/run.py in this process (conftest.run_main); it must succeed."""
    proc = run_main(args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def initial_weights(tmp_path: Path, name: str) -> tuple[Path, dict[str, torch.Tensor], torch.nn.Module]:
    """A seeded random model saved as the 'pretrained' weights the run loads with --pretrained-path."""
    from dist_train.model.build import create_model

    torch.manual_seed(123)
    model = create_model(name, 18, img_size=32)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"{name}-init.safetensors"
    save_file(state, str(path))
    return path, state, model


def epoch_checkpoints(out: Path) -> list[Path]:
    """Checkpoints written at epoch ends, in epoch order."""
    found = {}
    for ckpt in (out / "checkpoints").glob("step-*"):
        p = json.loads((ckpt / "progress.json").read_text())
        if p["batch"] == 0:
            found[p["epoch"]] = ckpt
    return [found[e] for e in sorted(found)]


def step_checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def optimizer_state(ckpt: Path) -> tuple[set[str], list[dict]]:
    """(names of parameters that have optimizer state, param groups) from accelerate's optimizer.bin."""
    sd = torch.load(ckpt / "optimizer.bin", map_location="cpu", weights_only=True)
    index_to_name = {i: n for g in sd["param_groups"] for i, n in zip(g["params"], g["param_names"])}
    return {index_to_name[i] for i, s in sd["state"].items() if s}, sd["param_groups"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def running_stat_owner(key: str) -> str:
    return key.rsplit(".", 1)[0] + ".weight"


def assert_frozen_exactly(state: dict, init: dict, trainable: set[str], params: set[str], where: str) -> None:
    """Parameters outside `trainable` and running statistics of BN layers outside it equal `init` bit for bit."""
    assert state.keys() == init.keys()
    for k, v in state.items():
        if k in params:
            frozen = k not in trainable
        else:  # a buffer: frozen when its layer's weight is
            frozen = running_stat_owner(k) not in trainable
        if frozen:
            assert torch.equal(v, init[k]), f"{where}: frozen {k} changed"


def changed(state: dict, init: dict, names: set[str]) -> set[str]:
    return {k for k in names if not torch.equal(state[k], init[k])}


# ----------------------------------------------------------------------------- DDP head -> all
@pytest.mark.ranks
@pytest.mark.parametrize("val_split", ["validation", "none"])
def test_ddp_head_then_all_stays_in_sync(mask_shards, tmp_path, val_split):
    """Every parameter and buffer ends bit-identical on both ranks, frozen weights stay as loaded.

    With --val-split none the last training forward is the last forward: no evaluation forward
    broadcasts rank 0's BatchNorm statistics after it, so the trainer itself must equalise them."""
    from dist_train.model.stages import count_params, trainable_names

    init_path, init, model = initial_weights(tmp_path, "test_resnet")
    params = {n for n, _ in model.named_parameters()}
    head = trainable_names(model, "head")
    out = tmp_path / "run"
    proc = launch(["dist_train/run.py", "--data", str(mask_shards), "--output", str(out), *RESNET,
                   "--epochs", "2", "--unfreeze", "head:1,all", "--workers", "1", "--keep-checkpoints", "10",
                   "--pretrained-path", str(init_path), "--val-split", val_split])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    assert len(set(summary["steps_per_rank"])) == 1 and summary["steps_per_rank"][0] > 0
    assert len(set(summary["param_hash_per_rank"])) == 1, "parameters or buffers differ across ranks"

    n_head, n_all = count_params(model, head), count_params(model)
    assert f"stage 0: epochs 0-0 train head ({n_head:,} params)" in proc.stdout
    assert f"stage 1: epochs 1-1 train all ({n_all:,} params)" in proc.stdout
    assert [(m["stage"], m["trainable_params"]) for m in metrics(out)] == [(0, n_head), (1, n_all)]

    after_head, after_all = epoch_checkpoints(out)
    for ckpt in (after_head, after_all):  # one model and one optimizer, however often the model was prepared
        files = {p.name for p in ckpt.iterdir()}
        assert {f for f in files if f.startswith(("model", "pytorch_model"))} == {"model.safetensors"}, files
        assert {f for f in files if f.startswith("optimizer")} == {"optimizer.bin"}, files

    s0 = load_file(after_head / "model.safetensors")
    assert_frozen_exactly(s0, init, head, params, "after the head stage")
    assert changed(s0, init, head) == head
    with_state, _ = optimizer_state(after_head)
    assert with_state == head

    s1 = load_file(after_all / "model.safetensors")
    assert changed(s1, init, params) == params
    running = {k for k in init if k.endswith(("running_mean", "running_var"))}
    assert running and changed(s1, init, running) == running
    with_state, _ = optimizer_state(after_all)
    assert with_state == params


def test_train_bn_moves_frozen_bn_only(mask_shards, tmp_path):
    from dist_train.model.stages import trainable_names

    init_path, init, model = initial_weights(tmp_path, "test_resnet")
    head = trainable_names(model, "head")
    out = tmp_path / "run"
    run_py(["--data", str(mask_shards), "--output", str(out), *RESNET, "--epochs", "2", "--unfreeze", "head:1,all",
            "--workers", "0", "--val-split", "none", "--max-steps", "3", "--train-bn",
            "--pretrained-path", str(init_path)])
    state = load_file(step_checkpoint(out, 3) / "model.safetensors")
    convs = {k for k in init if k.endswith(".weight") and init[k].ndim == 4}
    bn = {k for k in init if k.endswith(("running_mean", "running_var"))}
    bn_affine = {running_stat_owner(k) for k in bn}
    assert convs and not changed(state, init, convs)
    assert changed(state, init, bn) == bn
    assert changed(state, init, bn_affine) == bn_affine
    assert changed(state, init, head) == head


# ----------------------------------------------------------------------------- resume
def _assert_same_final(full: Path, part: Path) -> None:
    last = lambda d: sorted((d / "checkpoints").glob("step-*"))[-1]  # noqa: E731
    assert last(full).name == last(part).name
    a, b = load_file(last(full) / "model.safetensors"), load_file(last(part) / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    (sa, ga), (sb, gb) = optimizer_state(last(full)), optimizer_state(last(part))
    assert sa == sb
    assert [(g["param_names"], g["lr"], g["lr_scale"]) for g in ga] == [(g["param_names"], g["lr"], g["lr_scale"])
                                                                        for g in gb]


STAGED = ["--unfreeze", "head:1,last1:1,all", "--epochs", "3", "--layer-decay", "0.7", "--unfreeze-warmup", "5",
          "--drop", "0.2"]


def test_resume_inside_stage_two_equals_uninterrupted(mask_shards, tmp_path):
    # batch 16: 11 steps an epoch, half the steps of batch 8; the stop still falls in stage 2's warmup
    common = ["--data", str(mask_shards), *RESNET, *STAGED, "--workers", "0", "--val-split", "none",
              "--batch-size", "16"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_py([*common, "--output", str(full)])
    steps_per_epoch = json.loads((epoch_checkpoints(full)[0] / "progress.json").read_text())["step"]
    stop = steps_per_epoch + 3  # inside stage 2 (last1), during its warmup
    run_py([*common, "--output", str(part), "--max-steps", str(stop)])
    progress = json.loads((step_checkpoint(part, stop) / "progress.json").read_text())
    assert (progress["stage"], progress["epoch"], progress["batch"]) == (1, 1, 3)
    files = {f: f.read_bytes() for f in part.rglob("*") if f.is_file()}
    unstaged = [*common[:-len(STAGED) - 6], *common[-6:]]  # STAGED left out: --unfreeze forgotten (an IndexError)
    assert "--unfreeze" not in unstaged and "--val-split" in unstaged
    bad = run_main([*unstaged, "--output", str(part), "--resume", "auto"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "saved in stage 1 of its --unfreeze schedule; this run's (--unfreeze all) has 1 (0-0)" in bad.stderr
    assert {f: f.read_bytes() for f in part.rglob("*") if f.is_file()} == files
    proc = run_py([*common, "--output", str(part), "--resume", "auto"])
    assert "resumed from" in proc.stdout
    assert [m["stage"] for m in metrics(part)] == [0, 1, 2]
    _assert_same_final(full, part)


@pytest.mark.ranks
def test_resume_inside_stage_two_equals_uninterrupted_ddp(mask_shards, tmp_path):
    common = ["dist_train/run.py", "--data", str(mask_shards), *RESNET, *STAGED, "--workers", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    launch([*common, "--output", str(full)])
    steps_per_epoch = json.loads((epoch_checkpoints(full)[0] / "progress.json").read_text())["step"]
    launch([*common, "--output", str(part), "--max-steps", str(steps_per_epoch + 2)])
    assert json.loads((step_checkpoint(part, steps_per_epoch + 2) / "progress.json").read_text())["stage"] == 1
    launch([*common, "--output", str(part), "--resume", "auto"])
    for run in (full, part):
        assert len(set(json.loads((run / "summary.json").read_text())["param_hash_per_rank"])) == 1
    _assert_same_final(full, part)


# ----------------------------------------------------------------------------- LR per group
def _layer_of(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    from dist_train.model.stages import layer_groups

    groups = layer_groups(model)
    return {n: i for i, g in enumerate(groups) for n in g}, len(groups) - 1


def test_layer_decay_scales_each_group(mask_shards, tmp_path):
    _, _, model = initial_weights(tmp_path, "test_resnet")
    layer_of, last = _layer_of(model)
    out = tmp_path / "run"
    run_py(["--data", str(mask_shards), "--output", str(out), *RESNET, "--min-lr", "0.01", "--epochs", "2",
            "--unfreeze", "head:1,all", "--layer-decay", "0.5", "--workers", "0", "--val-split", "none",
            "--max-steps", "25"])
    for ckpt in (epoch_checkpoints(out)[0], step_checkpoint(out, 25)):  # in the head stage and after
        _, groups = optimizer_state(ckpt)
        assert {n for g in groups for n in g["param_names"]} == set(layer_of)  # every group from the start
        for g in groups:
            (lid,) = {layer_of[n] for n in g["param_names"]}
            assert math.isclose(g["lr"], 0.01 * 0.5 ** (last - lid), rel_tol=1e-9), (ckpt.name, g["group_name"])
    assert {m["lr"] for m in metrics(out)} == {0.01}  # the head's LR


def test_unfreeze_warmup_ramps_new_groups_from_zero(mask_shards, tmp_path):
    """With AdamW and no weight decay, a parameter's first update is lr * g/(|g| + eps): its size
    shows the LR the step used. A group unfrozen with --unfreeze-warmup 4 must not take that first
    step at more than a quarter of the LR."""
    from dist_train.model.stages import trainable_names

    _, _, model = initial_weights(tmp_path, "test_resnet")
    fresh = {n for n, _ in model.named_parameters()} - trainable_names(model, "head")
    lr, warmup = 0.01, 4
    out = tmp_path / "run"
    run_py(["--data", str(mask_shards), "--output", str(out), *RESNET, "--lr", str(lr), "--min-lr", str(lr),
            "--weight-decay", "0", "--opt", "adamw", "--epochs", "2", "--unfreeze", "head:1,all",
            "--unfreeze-warmup", str(warmup), "--workers", "0", "--val-split", "none", "--checkpoint-every", "1",
            "--keep-checkpoints", "30", "--max-steps", "27"])
    start = json.loads((epoch_checkpoints(out)[0] / "progress.json").read_text())["step"]
    states = [load_file(step_checkpoint(out, start + k) / "model.safetensors") for k in range(warmup + 2)]
    first = max((states[1][n] - states[0][n]).abs().max().item() for n in fresh)
    assert 0.5 * lr / warmup < first <= 1.001 * lr / warmup, f"first update of a new group {first:.2e}, LR {lr}"
    for k in range(warmup + 2):  # the head keeps its LR throughout; new groups reach it after the warmup
        _, groups = optimizer_state(step_checkpoint(out, start + k))
        head_lr = [g["lr"] for g in groups if not set(g["param_names"]) & fresh]
        assert head_lr and all(math.isclose(v, lr) for v in head_lr)
    _, groups = optimizer_state(step_checkpoint(out, start + warmup + 1))
    assert all(math.isclose(g["lr"], lr) for g in groups)


# ----------------------------------------------------------------------------- families
@pytest.mark.parametrize("name", sorted(FAMILY_RECIPES))
def test_schedule_on_four_families(mask_shards, tmp_path, name):
    """head -> last1 -> all on each family, starting from that family's recipe: each stage moves
    exactly its groups, leaves everything below bit-identical, and keeps one model per checkpoint."""
    from dist_train.model.stages import count_params, trainable_names

    init_path, init, model = initial_weights(tmp_path, name)
    params = {n for n, _ in model.named_parameters()}
    sets = [trainable_names(model, s) for s in ("head", "last1", "all")]
    out = tmp_path / "run"
    run_py(["--config", str(RECIPES / FAMILY_RECIPES[name]), "--data", str(mask_shards), "--output", str(out),
            "--model", name, *BASE, "--batch-size", "32", "--lr", "0.003", "--epochs", "3",
            "--unfreeze", "head:1,last1:1,all", "--unfreeze-warmup", "2", "--no-pretrained",
            "--pretrained-path", str(init_path), "--workers", "0", "--val-split", "none", "--keep-checkpoints", "5"])
    assert [(m["stage"], m["trainable_params"]) for m in metrics(out)] == [
        (i, count_params(model, s)) for i, s in enumerate(sets)]
    ckpts = epoch_checkpoints(out)
    assert len(ckpts) == 3
    prev = init
    for i, (ckpt, trainable) in enumerate(zip(ckpts, sets)):
        assert not list(ckpt.glob("model_*")) and not list(ckpt.glob("optimizer_*"))
        state = load_file(ckpt / "model.safetensors")
        assert_frozen_exactly(state, init, trainable, params, f"{name} stage {i}")
        newly = trainable - (sets[i - 1] if i else set())
        assert changed(state, prev, newly), f"{name} stage {i}: the newly unfrozen groups did not move"
        assert optimizer_state(ckpt)[0] == trainable
        prev = state
    first_group = _layer_of(model)[0]
    stem = {n for n, lid in first_group.items() if lid == 0}
    assert changed(prev, init, stem) == stem


# ----------------------------------------------------------------------------- recipes
def test_recipes_load_and_validate():
    import timm

    from dist_train.config import load_yaml, parse_config
    from dist_train.model.stages import parse_schedule, stage_epochs

    files = sorted(RECIPES.glob("*.yaml"))
    assert set(FAMILY_RECIPES.values()) <= {f.name for f in files}
    for f in files:
        assert load_yaml(str(f))
        cfg = parse_config(["--config", str(f), "--data", "x"])
        assert timm.is_model(cfg.model.model), f.name
        stage_epochs(parse_schedule(cfg.stages.unfreeze), cfg.optim.epochs)  # the schedule fits the epochs
    for name in FAMILY_RECIPES.values():  # each says when to pick it
        text = (RECIPES / name).read_text()
        assert text.startswith("#") and "Pick it when" in text, name
