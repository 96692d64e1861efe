"""--grad-checkpointing: the same weights and BatchNorm statistics as without it, one line for a
model that cannot, DDP + staged unfreezing in sync, and the bench's memory A/B."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from conftest import launch, run_main

COMMON = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--seed", "0", "--warmup-epochs", "0",
          "--lr", "0.01", "--no-plots"]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    last = sorted((out / "checkpoints").glob("step-*"))[-1]
    return load_file(last / "model.safetensors")


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"


def train_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, keep=None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        if keep is None:
            loss.backward()
        else:
            with keep(model):
                loss.backward()
        opt.step()


def test_recomputation_would_update_batchnorm_twice_and_keep_running_stats_undoes_it():
    """timm's checkpoint_seq runs each block's forward again in backward, in training mode: BN
    statistics move twice per step. KeepRunningStats restores them; parameters never differ."""
    from dist_train.model.recompute import KeepRunningStats

    torch.manual_seed(0)
    plain = timm.create_model("test_resnet", num_classes=5)
    raw, kept = copy.deepcopy(plain), copy.deepcopy(plain)
    for m in (raw, kept):
        m.set_grad_checkpointing()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    train_steps(plain, x, y, 2)
    train_steps(raw, x, y, 2)
    train_steps(kept, x, y, 2, keep=KeepRunningStats(True))
    params = {n for n, _ in plain.named_parameters()}
    sd_plain, sd_raw, sd_kept = plain.state_dict(), raw.state_dict(), kept.state_dict()
    assert all(torch.equal(sd_plain[k], sd_raw[k]) for k in params)
    assert sd_raw["layer1.0.bn1.num_batches_tracked"].item() == 4  # checkpointed block: counted twice
    assert sd_raw["bn1.num_batches_tracked"].item() == 2  # the stem is not checkpointed
    assert not torch.equal(sd_plain["layer1.0.bn1.running_var"], sd_raw["layer1.0.bn1.running_var"])
    assert_same_state(sd_plain, sd_kept)
    assert not KeepRunningStats(False)._buffers  # disabled: nothing copied


@pytest.mark.parametrize("head", ["single", "multi"])
def test_same_parameters_and_bn_statistics_after_k_steps(mask_shards, tmp_path, head):
    """fp32 on the CPU, through the real trainer: bit-identical parameters and buffers."""
    runs = {}
    for flag in ("--no-grad-checkpointing", "--grad-checkpointing"):
        out = tmp_path / flag
        proc = run_main(["--data", str(mask_shards), "--output", str(out), *COMMON, "--head", head, "--workers", "0",
                         "--val-split", "none", "--max-steps", "3", "--mixed-precision", "no", flag])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        runs[flag] = final_state(out)
    assert_same_state(runs["--no-grad-checkpointing"], runs["--grad-checkpointing"])


def test_multi_head_model_checkpoints_its_backbone():
    from dist_train.tasks import build_model

    model = build_model("test_resnet", 18, head="multi")
    model.set_grad_checkpointing()
    assert model.backbone.grad_checkpointing


def test_a_model_without_it_is_one_line_exit_2(mask_shards, tmp_path):
    from dist_train.errors import UserError
    from dist_train.model.recompute import set_grad_checkpointing

    with pytest.raises(UserError, match="model dla34 does not support gradient checkpointing"):
        set_grad_checkpointing(timm.create_model("dla34", num_classes=3), "dla34")
    with pytest.raises(UserError, match="has no set_grad_checkpointing"):
        set_grad_checkpointing(torch.nn.Linear(2, 2), "linear")
    proc = run_main(["--data", str(mask_shards), "--output", str(tmp_path / "run"), *COMMON, "--model", "dla34",
                     "--workers", "0", "--grad-checkpointing"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --grad-checkpointing: timm model dla34 does not support"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_yaml_key(tmp_path):
    from dist_train.config import parse_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("grad_checkpointing: true\n")
    assert parse_config(["--config", str(cfg_file), "--data", "x"]).model.grad_checkpointing
    assert not parse_config(["--config", str(cfg_file), "--data", "x", "--no-grad-checkpointing"]).model.grad_checkpointing
    assert not parse_config(["--data", "x"]).model.grad_checkpointing


@pytest.mark.ranks
def test_ddp_staged_unfreezing_stays_in_sync(mask_shards, tmp_path):
    """2 gloo processes, head:1,all (DDP rebuilt at the stage change, the stem frozen first): the
    ranks agree on every parameter and buffer, and both stages trained."""
    out = tmp_path / "run"
    launch(["dist_train/run.py", "--data", str(mask_shards), "--output", str(out), *COMMON, "--epochs", "2",
            "--unfreeze", "head:1,all", "--workers", "1", "--val-split", "none", "--grad-checkpointing"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    assert len(set(summary["steps_per_rank"])) == 1 and summary["steps_per_rank"][0] > 0
    assert len(set(summary["param_hash_per_rank"])) == 1, "parameters or buffers differ across ranks"
    assert yaml.safe_load((out / "config.yaml").read_text())["grad_checkpointing"] is True
    epochs = [json.loads((c / "progress.json").read_text()) for c in sorted((out / "checkpoints").glob("step-*"))]
    assert {p["stage"] for p in epochs} == {0, 1}
