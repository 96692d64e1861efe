"""The Trainer in-process: built from injected tiny parts, each option's effect, components that
decide their own timing, and a config that stays as it was given. (The DDP invariants are the
2-process tests in test_train, test_staged and test_robust.)"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.scheduler.step_lr import StepLRScheduler

from conftest import run_main
from dist_train.config import Config, validate
from dist_train.data.loaders import build_train_loader
from dist_train.data.plan import Plan
from dist_train.infer.tta import TTA
from dist_train.shardset.format import label_counts, load_info
from dist_train.tasks.losses import class_weights_from_counts, f1_loss, focal_loss
from dist_train.tasks.mask.model import MultiHeadModel, multi_head_loss, split_heads, split_targets
from dist_train.train.checkpoint import Checkpointer, Progress
from dist_train.train.evaluator import Evaluator
from dist_train.train.stager import Stager
from dist_train.train.trainer import Trainer

BASE = dict(model="test_resnet", img_size=32, batch_size=8, lr=0.01, seed=0, warmup_epochs=0.0, epochs=1, workers=0,
            plots=False)


def make_cfg(shards: Path, out: Path | None, **kw) -> Config:
    return validate(Config.from_flat({**BASE, "data": str(shards), "output": None if out is None else str(out), **kw}))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def a_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    trainer.train_loader.set_epoch(0)
    images, targets, _ = next(iter(trainer.train_loader))
    return images, targets


def epoch_targets(loader) -> list[int]:
    loader.set_epoch(0)
    return [t for _, targets, _ in loader for t in targets.tolist()]


# ----------------------------------------------------------------------------- injected parts
class ListLoader:
    """A stand-in TrainLoader: the same random uint8 batches every epoch (one process, one
    shard); records set_epoch calls."""

    def __init__(self, batches: int, batch_size: int = 4, size: int = 32, classes: int = 18) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g),
                      torch.randint(0, classes, (batch_size,), generator=g),
                      [f"b{b}/s{i}" for i in range(batch_size)]) for b in range(batches)]
        self.calls: list[tuple[int, int]] = []
        self.bad_samples, self.shards_per_rank = 0, 1
        self.num_samples, self.batch_size = batches * batch_size, batch_size
        self._skip = 0

    def __len__(self) -> int:
        return len(self.data)

    def plan(self, epoch: int, done=None) -> Plan:
        return Plan(0, epoch, (self.num_samples,), 1, 1, self.batch_size, done=done)

    def set_epoch(self, epoch: int, skip_batches: int = 0, done=None) -> None:
        self.calls.append((epoch, skip_batches))
        self._skip = skip_batches

    def __iter__(self):
        return iter(self.data[self._skip:])


def test_trainer_runs_from_injected_parts(mask_shards, tmp_path):
    """Model, loader and loss injected: every batch of every epoch is one step, each component
    acts on its own schedule (metrics line and checkpoint at each epoch end), and a resume
    continues the epoch where the checkpoint left it."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=18)
    loader, calls = ListLoader(batches=5), []

    def criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(out.shape))
        return F.cross_entropy(out, y)

    out = tmp_path / "run"
    cfg = make_cfg(mask_shards, out, epochs=2, val_split="none", keep_checkpoints=10)
    result = Trainer(cfg, model=model, train_loader=loader, criterion=criterion).train()
    assert result["step"] == 10 and calls == [(4, 18)] * 10
    assert loader.calls == [(0, 0), (1, 0)]
    assert [(r["epoch"], r["step"]) for r in rows(out)] == [(0, 5), (1, 10)]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["steps_per_rank"] == [10] and summary["batches_per_rank"] == [10]

    part = tmp_path / "part"
    Trainer(make_cfg(mask_shards, part, epochs=2, val_split="none", max_steps=7),
            model=timm.create_model("test_resnet", num_classes=18), train_loader=ListLoader(5),
            criterion=criterion).train()
    again = ListLoader(5)
    r = Trainer(make_cfg(mask_shards, part, epochs=2, val_split="none", resume="auto"),
                model=timm.create_model("test_resnet", num_classes=18), train_loader=again, criterion=criterion).train()
    assert again.calls == [(1, 2)] and r["step"] == 10  # epoch 1, after its first 2 batches


# ----------------------------------------------------------------------------- options take effect
def run(mask_shards: Path, out: Path, **kw) -> Trainer:
    """3 steps with an evaluation at step 3 (what test_recipe_option_trains ran as a process)."""
    trainer = Trainer(make_cfg(mask_shards, out, max_steps=3, eval_every=3, **kw))
    trainer.train()
    last = rows(out)[-1]
    assert last["step"] == 3 and last["train_loss"] == last["train_loss"]  # not NaN
    return trainer


def effect_head_multi(t: Trainer, mask_shards: Path) -> None:
    assert isinstance(t.acc.unwrap_model(t.model), MultiHeadModel)
    out = torch.randn(4, 18).log_softmax(1)
    y = torch.tensor([0, 5, 11, 17])
    assert torch.equal(t.criterion(out, y), multi_head_loss(out, y, smoothing=0.1))
    assert json.loads((t.out / "best" / "config.json").read_text())["dist_train"]["head"] == "multi"


def effect_age_bins(t: Trainer, mask_shards: Path) -> None:
    """30,58: persons aged 58-59 move from age group 1 to 2; nothing else changes."""
    info = load_info(str(mask_shards))
    plain = build_train_loader(str(mask_shards), info, "train", aug=t.aug, batch_size=8, workers=0, world_size=1,
                               rank=0, seed=0)
    new, old = np.array(epoch_targets(t.train_loader)), np.array(epoch_targets(plain))
    changed = new != old
    assert changed.any() and (old[changed] % 3 == 1).all() and (new[changed] == old[changed] + 1).all()


def effect_age_bins_weights(t: Trainer, mask_shards: Path) -> None:
    """--class-weights auto and --sampler sqrt weigh the classes the model is trained on: with 30,58
    the counts of the targets (persons aged 58-59 in the >=58 groups), not _info.json's 30/60 counts."""
    from dist_train.data.loaders import sampler_weights
    from dist_train.shardset.format import read_meta
    from dist_train.tasks.mask import labels as L

    info = load_info(str(mask_shards))
    targets = [L.target_from_meta(m, None, bins=(30, 58)) for m in read_meta(str(mask_shards), info, "train").values()]
    counts = {str(c): targets.count(c) for c in range(18)}
    assert counts != {str(c): n for c, n in label_counts(info, "train").items()}  # the cut moves some persons
    out, y = torch.randn(6, 18), torch.tensor([0, 1, 2, 5, 17, 3])
    torch.testing.assert_close(t.criterion(out, y),
                               focal_loss(out, y, weight=class_weights_from_counts(counts, 18), smoothing=0.1))
    np.testing.assert_allclose(t.train_loader._reader.class_weights, sampler_weights("sqrt", counts, 18))


def effect_focal_weights(t: Trainer, mask_shards: Path) -> None:
    info = load_info(str(mask_shards))
    weight = class_weights_from_counts(label_counts(info, "train"), 18)
    out, y = torch.randn(6, 18), torch.tensor([0, 1, 5, 5, 17, 3])
    torch.testing.assert_close(t.criterion(out, y), focal_loss(out, y, weight=weight, smoothing=0.1))
    assert not torch.allclose(t.criterion(out, y), focal_loss(out, y, smoothing=0.1))  # the weights matter


def effect_f1(t: Trainer, mask_shards: Path) -> None:
    out, y = torch.randn(6, 18), torch.tensor([0, 1, 5, 5, 17, 3])
    torch.testing.assert_close(t.criterion(out, y), f1_loss(out, y, 18, smoothing=0.1))


def mixed_batch(t: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-sized random logits and a real Mixup/CutMix target batch of the trainer's loader."""
    _, y = t.prep.train(*a_batch(t))
    assert y.shape == (8, 18) and torch.allclose(y.sum(1), torch.ones(8))
    return torch.randn(8, 18, generator=torch.Generator().manual_seed(0)), y


def effect_f1_cutmix(t: Trainer, mask_shards: Path) -> None:
    """Soft targets reach the F1 loss as they are (timm's Mixup smoothed them once already)."""
    assert (t.prep.mixup.mixup_alpha, t.prep.mixup.cutmix_alpha) == (0.0, 1.0)
    out, y = mixed_batch(t)
    assert y.min() > 0  # smoothed by Mixup
    torch.testing.assert_close(t.criterion(out, y), f1_loss(out, y, 18))


def effect_focal_mixup_weights(t: Trainer, mask_shards: Path) -> None:
    weight = class_weights_from_counts(label_counts(load_info(str(mask_shards)), "train"), 18)
    out, y = mixed_batch(t)
    torch.testing.assert_close(t.criterion(out, y), focal_loss(out, y, weight=weight))
    assert not torch.allclose(t.criterion(out, y), focal_loss(out, y))  # the weights matter


def effect_multi_mixup(t: Trainer, mask_shards: Path) -> None:
    """Each head learns its task's marginal of the mixed 18-class target."""
    assert isinstance(t.acc.unwrap_model(t.model), MultiHeadModel)
    out, y = mixed_batch(t)
    out = out.log_softmax(1)
    torch.testing.assert_close(t.criterion(out, y), multi_head_loss(out, y))
    heads = split_heads(out)
    torch.testing.assert_close(t.criterion(out, y), sum(F.cross_entropy(h, q) for h, q in zip(heads, split_targets(y))))


def effect_mixup(t: Trainer, mask_shards: Path) -> None:
    assert isinstance(t.prep.mixup, Mixup)
    assert (t.prep.mixup.mixup_alpha, t.prep.mixup.cutmix_alpha) == (0.2, 1.0)
    x, y = t.prep.train(*a_batch(t))
    assert y.shape == (8, 18) and torch.allclose(y.sum(1), torch.ones(8)) and (y.max(1).values < 1).all()


def effect_val_tta(t: Trainer, mask_shards: Path) -> None:
    """Validation averages the views' probabilities: the logged val_loss is the TTA one."""
    assert t.evaluator.tta == TTA(hflip=True, scales=(0.9, 1.0))
    with_tta = t.evaluator.metrics(t.model, t.acc)
    assert with_tta["val_loss"] == pytest.approx(rows(t.out)[-1]["val_loss"], rel=1e-6)
    t.evaluator.tta = TTA()
    assert t.evaluator.metrics(t.model, t.acc)["val_loss"] != pytest.approx(with_tta["val_loss"], rel=1e-4)


def effect_crop_erase_aa(t: Trainer, mask_shards: Path) -> None:
    tf = t.train_loader.transform
    assert not tf.random_crop and tf.auto_augment is not None
    assert isinstance(t.prep.erase, RandomErasing) and t.prep.erase.probability == 0.25
    images, targets = a_batch(t)
    t.prep.erase.probability = 1.0  # then every image gets a patch: prep.train must apply it
    erased, _ = t.prep.train(images, targets)
    assert not torch.equal(erased, t.prep.images(images))


def effect_accum_clip_sgd_step(t: Trainer, mask_shards: Path) -> None:
    assert isinstance(t.optimizer.optimizer, torch.optim.SGD) and isinstance(t.scheduler, StepLRScheduler)
    assert t.progress.batch == 6 and t.batches_seen == 6  # 3 steps of 2 micro-batches
    assert t.steps_per_epoch == math.ceil(21 / 2)
    assert t.clipped == 3


RECIPE_OPTIONS = [
    (["head", "multi"], effect_head_multi),
    (["age_bins", "30,58"], effect_age_bins),
    (["age_bins", "30,58", "loss", "focal", "class_weights", "auto", "sampler", "sqrt"], effect_age_bins_weights),
    (["loss", "focal", "class_weights", "auto"], effect_focal_weights),
    (["loss", "f1"], effect_f1),
    (["loss", "f1", "cutmix", 1.0], effect_f1_cutmix),
    (["loss", "focal", "mixup", 0.2, "class_weights", "auto"], effect_focal_mixup_weights),
    (["head", "multi", "mixup", 0.2], effect_multi_mixup),
    (["mixup", 0.2, "cutmix", 1.0], effect_mixup),
    (["val_tta", "hflip,scales:0.9/1.0"], effect_val_tta),
    (["crop", "center", "reprob", 0.25, "aa", "rand-m9-mstd0.5"], effect_crop_erase_aa),
    (["grad_accum_steps", 2, "clip_grad", 1.0, "opt", "sgd", "sched", "step"], effect_accum_clip_sgd_step),
]


@pytest.mark.parametrize("option, effect", RECIPE_OPTIONS, ids=["-".join(map(str, o[0])) for o in RECIPE_OPTIONS])
def test_recipe_option_trains(mask_shards, tmp_path, monkeypatch, option, effect):
    """Each competition-recipe option trains 3 steps, and does what it says."""
    kw = dict(zip(option[::2], option[1::2]))
    if "clip_grad" in kw:  # count the clipping calls on the accelerator the trainer will use
        acc = Accelerator(cpu=True)
        real = acc.clip_grad_norm_
        counter = {"n": 0}

        def spy(*args, **kwargs):
            counter["n"] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(acc, "clip_grad_norm_", spy)
        trainer = Trainer(make_cfg(mask_shards, tmp_path / "run", max_steps=3, eval_every=3, **kw), accelerator=acc)
        trainer.train()
        trainer.clipped = counter["n"]
        last = rows(tmp_path / "run")[-1]
        assert last["step"] == 3 and last["train_loss"] == last["train_loss"]  # not NaN
    else:
        trainer = run(mask_shards, tmp_path / "run", **kw)
    effect(trainer, mask_shards)


@pytest.mark.parametrize("option, message", [
    (["--head", "multi"], "--head multi: expected single for this shard set (task classify, folder layout"),
    (["--age-bins", "30,58"], "--age-bins 30,58: not available for this shard set (task classify"),
    (["--relabel", "fixes.csv"], "--relabel fixes.csv: not available for this shard set"),
])
def test_task_options_of_another_task_are_refused(folder_shards, tmp_path, option, message):
    """A plain class-folder set has no person metadata and no multi-head model: one line, exit 2."""
    p = run_main(["--data", str(folder_shards), "--output", str(tmp_path / "o"), "--model", "test_resnet",
                  "--workers", "0", *option])
    assert p.returncode == 2 and p.stderr.startswith("error: ") and message in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- timing and config
def test_loader_workers_are_forked_before_the_first_collective(mask_shards, tmp_path, monkeypatch):
    """A fork amid collectives can inherit CPython's thread-state lock from a gloo thread and hang
    (TrainLoader.start): both loaders' workers exist before the stager first wraps the model in
    DDP (its broadcast is the first collective), the train workers having read nothing, and the
    run still sees every sample once."""
    seen = []
    enter = Stager.enter

    def recording(self, *args, **kw):
        seen.append((trainer.train_loader._loader._iterator is not None, trainer.val_loader._loader._iterator is not None,
                     trainer.train_loader.bad_samples))
        return enter(self, *args, **kw)

    monkeypatch.setattr(Stager, "enter", recording)
    out = tmp_path / "run"
    trainer = Trainer(make_cfg(mask_shards, out, epochs=1, workers=1))
    trainer.train()
    assert seen[0] == (True, True, 0)
    info = json.loads((mask_shards / "_info.json").read_text())["splits"]
    assert rows(out)[-1]["val_samples"] == info["validation"]["num_samples"]
    assert trainer.progress.epoch == 1 and trainer.batches_seen == trainer.train_loader.plan(0).batches_per_rank


def test_checkpointer_and_evaluator_decide_their_own_timing(tmp_path):
    acc = Accelerator(cpu=True)
    ck = Checkpointer(tmp_path / "run", keep=10, every=2)
    saved = [s for s in range(1, 6) if ck.save(acc, Progress(step=s)) is not None]
    assert saved == [2, 4]
    assert ck.save(acc, Progress(step=5), force=True) is not None
    assert [p.name for p in ck.complete()] == ["step-00000002", "step-00000004", "step-00000005"]
    assert Checkpointer(tmp_path / "r2", keep=1).save(acc, Progress(step=3)) is None  # no --checkpoint-every
    ev = Evaluator(None, every=3, task=None, class_names=[], out=tmp_path, prep=None, export={}, meta={})
    assert [s for s in range(1, 10) if ev.should_evaluate(s, end_of_epoch=False)] == [3, 6, 9]
    assert ev.should_evaluate(4, end_of_epoch=True) and ev.validate(None, acc, Progress()) == {}


def test_the_config_given_is_never_changed(mask_shards, tmp_path):
    cfg = make_cfg(mask_shards, None, debug=True, debug_steps=2, workers=3)
    before = cfg.flat()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.workers = 0  # type: ignore[misc]
    trainer = Trainer(cfg)
    trainer.train()
    assert cfg.flat() == before  # debug's overrides went to the trainer's own copy
    assert (trainer.cfg.data.workers, trainer.cfg.runtime.mixed_precision) == (0, "no")
    assert trainer.cfg.checkpoint.output and Path(trainer.cfg.checkpoint.output).is_dir()
    assert trainer.batches == 2

    from dist_train.train.overfit import overfit

    ocfg = make_cfg(mask_shards, None, overfit_batches=1, max_steps=2)
    before = ocfg.flat()
    assert overfit(ocfg)["is_main"] and ocfg.flat() == before


# ----------------------------------------------------------------------------- early stopping, time budget
def test_patience_stops_after_evaluations_without_improvement(mask_shards, tmp_path, capsys):
    """Only the head trains, at LR 1e-12: val macro F1 never improves after the first evaluation,
    so --patience 2 stops at the third, with a checkpoint, and summary.json says why."""
    out = tmp_path / "run"
    result = Trainer(make_cfg(mask_shards, out, epochs=3, eval_every=1, patience=2, lr=1e-12, unfreeze="head",
                              val_split="validation")).train()
    assert result["step"] == 3 and not result["stopped"]
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "patience" and summary["finished"] is True and summary["step"] == 3
    assert (out / "checkpoints" / "step-00000003").is_dir()
    assert "early stop at step 3: val macro F1 has not improved for 2 evaluations" in capsys.readouterr().out


def test_resume_of_a_finished_run_is_one_line_and_writes_nothing(mask_shards, tmp_path, capsys):
    """summary.json says `finished`: --resume auto has nothing left. It trained one more evaluation
    past --patience on each resume (and rewrote summary.json, stopped_by and all); a run at its
    --epochs end was rewritten too. Raising --patience trains on."""
    out = tmp_path / "run"
    kw = dict(epochs=3, eval_every=1, patience=2, lr=1e-12, unfreeze="head", val_split="validation")
    Trainer(make_cfg(mask_shards, out, **kw)).train()
    files = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    capsys.readouterr()
    result = Trainer(make_cfg(mask_shards, out, resume="auto", **kw)).train()
    assert result["step"] == 3 and result["stopped"]
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == files
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"dist_train: {out} is finished already (step-00000003: 0 epochs completed; 2 evaluations without a better "
        "val macro F1, --patience 2): nothing to resume, nothing written; raise --epochs, --max-steps or --patience "
        "to train on")
    Trainer(make_cfg(mask_shards, out, resume="auto", **{**kw, "patience": 3})).train()
    assert json.loads((out / "summary.json").read_text())["step"] == 4


class FakeClock:
    """Monotonic seconds that advance 10 s per reading: each training step 'takes' 10 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


def test_time_limit_stops_cleanly_and_resume_finishes(mask_shards, tmp_path, capsys):
    """--time-limit 60s with 10 s steps: after the 4th step two more steps would not fit, so the
    run checkpoints and stops (not finished: a requeue continues it); --resume auto ends the run."""
    from dist_train.train.guard import StepGuard

    class Timed(Trainer):
        def build_guard(self) -> StepGuard:
            return StepGuard(5, 0.01, time_limit=60.0, clock=FakeClock())

    out = tmp_path / "run"
    result = Timed(make_cfg(mask_shards, out, val_split="none", time_limit="60s")).train()
    summary = json.loads((out / "summary.json").read_text())
    assert result["stopped"] and summary["stopped_by"] == "time-limit" and summary["finished"] is False
    assert summary["step"] == 4 and (out / "checkpoints" / "step-00000004").is_dir()
    assert "stopped at step 4 to stay within --time-limit 60s" in capsys.readouterr().out
    Trainer(make_cfg(mask_shards, out, val_split="none", resume="auto")).train()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True and summary["stopped_by"] is None and summary["step"] == 21


@pytest.mark.parametrize("value, message", [("5d", "expected a duration"), ("0s", "positive")])
def test_bad_time_limit_is_one_line(mask_shards, tmp_path, value, message):
    p = run_main(["--data", str(mask_shards), "--output", str(tmp_path / "o"), "--time-limit", value])
    assert p.returncode == 2 and f"--time-limit {value}" in p.stderr and message in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- model EMA
def test_model_ema_is_evaluated_checkpointed_and_resumed_exactly(mask_shards, tmp_path):
    """--model-ema: val_*_ema beside val_*, best/ says which weights won, frozen groups stay as
    loaded in the EMA too, and a stopped and resumed run ends with the same EMA as an uninterrupted one."""
    ema_args = dict(model_ema=True, model_ema_decay=0.9, epochs=2, unfreeze="head:1,all", keep_checkpoints=10)
    full, part = tmp_path / "full", tmp_path / "part"
    t = Trainer(make_cfg(mask_shards, full, **ema_args))
    t.train()
    last = rows(full)[-1]
    assert {"val_loss_ema", "val_acc_ema", "val_macro_f1_ema"} <= set(last) and "val_samples_ema" not in last
    best = json.loads((full / "best" / "metrics.json").read_text())
    assert best["weights"] in ("ema", "model")
    ema, raw = t.ema.module.state_dict(), t.acc.unwrap_model(t.model).state_dict()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert list((full / "checkpoints" / "step-00000021").glob("custom_checkpoint_*"))  # the EMA is in the checkpoint

    Trainer(make_cfg(mask_shards, part, max_steps=5, **ema_args)).train()
    Trainer(make_cfg(mask_shards, part, resume="auto", **ema_args)).train()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, part))
    assert a["ema_hash_per_rank"] == b["ema_hash_per_rank"] and a["param_hash_per_rank"] == b["param_hash_per_rank"]
    assert rows(part)[-1]["val_macro_f1_ema"] == last["val_macro_f1_ema"]


def test_model_ema_of_frozen_groups_stays_exactly_as_loaded(mask_shards, tmp_path):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=18)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    t = Trainer(make_cfg(mask_shards, tmp_path / "run", model_ema=True, unfreeze="head", max_steps=4,
                         val_split="none"), model=model)
    t.train()
    head = t.stager.trainable
    for k, v in t.ema.module.state_dict().items():
        if k.rsplit(".", 1)[0] + ".weight" not in head and k not in head:
            assert torch.equal(v, init[k]), f"frozen {k} moved in the EMA"


# ----------------------------------------------------------------------------- balanced sampling
@pytest.fixture(scope="module")
def skewed_shards(tmp_path_factory) -> Path:
    """3 classes of 100, 30 and 10 images (10-fold apart), 16 px, in shards of 20."""
    from PIL import Image

    from dist_train.shardset.writer import write_shards

    src = tmp_path_factory.mktemp("skewed") / "src"
    rng = np.random.default_rng(0)
    for c, n in enumerate((100, 30, 10)):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(src / f"c{c}" / f"{i}.png")
    out = src.parent / "shards"
    write_shards(src, out, layout="folder", val_fraction=0.0, samples_per_shard=20, workers=1, progress=False)
    return out


@pytest.mark.parametrize("sampler, low, high", [("none", 8, 12), ("sqrt", 2, 4.5), ("balanced", 1, 2)])
def test_sampler_reweights_the_classes_the_trainer_consumes(skewed_shards, tmp_path, sampler, low, high):
    """train_class_counts (all ranks, since the last metrics line) shows the re-weighting: the
    natural 10:1, about sqrt(10):1, or under 2:1 for balanced; the steps per epoch stay the same."""
    out = tmp_path / "run"
    t = Trainer(make_cfg(skewed_shards, out, val_split="none", batch_size=10, epochs=3, img_size=16,
                         sampler=sampler))
    t.train()
    counts = np.sum([r["train_class_counts"] for r in rows(out)], axis=0)
    assert counts.sum() == 3 * 14 * 10 and t.steps_per_epoch == 14
    assert low <= counts.max() / counts.min() < high, counts


@pytest.mark.ranks
def test_sampler_under_ddp_keeps_equal_steps(skewed_shards, tmp_path):
    from conftest import launch

    out = tmp_path / "run"
    launch(["dist_train/run.py", "--data", str(skewed_shards), "--output", str(out), "--model", "test_resnet",
            "--img-size", "16", "--batch-size", "5", "--epochs", "1", "--workers", "1", "--val-split", "none",
            "--sampler", "balanced", "--seed", "0"])
    s = json.loads((out / "summary.json").read_text())
    assert s["steps_per_rank"] == [14, 14] and len(set(s["param_hash_per_rank"])) == 1
    counts = rows(out)[-1]["train_class_counts"]
    assert sum(counts) == 140 and max(counts) < 2 * min(counts)


def test_a_class_without_training_samples_trains_with_finite_weights(skewed_shards, tmp_path, capsys):
    """A set sharded with --classes-from that lacks class c1: --sampler balanced never draws it
    (weight 0, no division by zero), --class-weights auto gives it an average weight, the start
    says the model has no sample of it, and the loss stays finite."""
    from PIL import Image

    from dist_train.shardset.format import class_names
    from dist_train.shardset.writer import write_shards

    rng = np.random.default_rng(1)
    for name, n in (("c0", 10), ("c2", 30)):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "src" / name / f"{i}.png")
    data = tmp_path / "shards"
    info = write_shards(tmp_path / "src", data, options={"classes": class_names(load_info(str(skewed_shards)))},
                        val_fraction=0.0, samples_per_shard=10, workers=1, progress=False)
    assert info["label_counts"]["train"] == {"0": 10, "1": 0, "2": 30}
    t = Trainer(make_cfg(data, tmp_path / "run", val_split="none", batch_size=8, epochs=2, img_size=16,
                         sampler="balanced", class_weights="auto"))
    capsys.readouterr()
    t.train()
    assert "no training sample of class c1: the model only learns not to predict it" in capsys.readouterr().out
    logits, y = torch.randn(6, 3), torch.tensor([0, 2, 2, 0, 2, 2])
    want = F.cross_entropy(logits, y, weight=torch.tensor([1.5, 1.0, 0.5]), label_smoothing=0.1)
    torch.testing.assert_close(t.criterion(logits, y), want)
    counts = np.sum([r["train_class_counts"] for r in rows(tmp_path / "run")], axis=0)
    assert counts[1] == 0 and counts.sum() == 2 * 5 * 8 and counts.max() < 2 * counts[counts > 0].min()
    assert all(math.isfinite(r["train_loss"]) for r in rows(tmp_path / "run"))
