"""A non-finite loss is a bad step to skip only when there is a good state to keep: before any
good update, or with weights already non-finite, the run stops with one line (RunFailed, exit 1),
and best/ never receives non-finite weights (issue 20). In-process Trainers from tiny parts; the
skip-and-stop of later bad steps is test_robust's."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
import pytest

from dist_train.config import Config
from dist_train.errors import RunFailed
from dist_train.train.trainer import Trainer
from test_trainer import BASE, ListLoader, make_cfg


def nan_from(step: int, trainer_box: list):
    def criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if trainer_box[0].progress.step >= step else loss
    return criterion


def build(cfg: Config, batches: int, criterion=None) -> Trainer:
    torch.manual_seed(0)
    box: list = []
    t = Trainer(cfg, model=timm.create_model("test_resnet", num_classes=18), train_loader=ListLoader(batches),
                criterion=criterion or nan_from(0, box))
    box.append(t)
    return t


def test_non_finite_loss_on_the_first_step_stops_the_run(mask_shards, tmp_path):
    out = tmp_path / "run"
    t = build(make_cfg(mask_shards, out, val_split="none", epochs=2), batches=4)
    with pytest.raises(RunFailed, match=r"non-finite loss at step 0, before any good update") as e:
        t.train()
    assert e.value.all_ranks and "\n" not in str(e.value)
    assert t.progress.batch == 1 and t.progress.updates == 0  # stopped at once, not after --max-bad-steps
    assert not (out / "best").exists()


def test_a_later_bad_step_is_still_skipped(mask_shards, tmp_path):
    """After a good update the old rule holds: skipped, the run goes on (and ends)."""
    box: list = []
    out = tmp_path / "run"
    t = build(make_cfg(mask_shards, out, val_split="none"), batches=3, criterion=nan_from(2, box))
    box.append(t)
    assert t.train()["step"] == 3 and t.progress.updates == 2
    assert (out / "best" / "model.safetensors").is_file()


def test_infinite_lr_never_writes_non_finite_weights(mask_shards, tmp_path):
    """--lr inf is refused by the config (test_config); the trainer does not rely on that: the
    first update makes the weights non-finite; the next step's loss is NaN and the run stops,
    and with no next step the epoch end refuses to write them to best/."""
    cfg = Config.from_flat({**BASE, "data": str(mask_shards), "output": str(tmp_path / "two"), "val_split": "none",
                            "lr": float("inf")})  # not validated: as if a check upstream were missing
    t = build(cfg, batches=3, criterion=F.cross_entropy)
    with pytest.raises(RunFailed, match=r"non-finite loss at step 1 with non-finite weights"):
        t.train()
    assert t.progress.updates == 1 and not (tmp_path / "two" / "best").exists()

    cfg = cfg.replace(output=str(tmp_path / "one"))
    t = build(cfg, batches=1, criterion=F.cross_entropy)
    with pytest.raises(RunFailed, match=r"the weights are not finite \(NaN/inf\): not saved to .*best"):
        t.train()
    assert not (tmp_path / "one" / "best").exists()
