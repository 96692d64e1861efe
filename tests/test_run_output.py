"""What a run tells its user, in-process on tiny parts: the overfit verdict against the floor the
loss can reach, --debug bounded by steps, the best evaluation in the `done:` line, summary.json,
results.csv, the compact per-evaluation line and the table, report.png at the end, the start
summary, and the trackers' per-step train loss and LR."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import run_main
from dist_train.config import Config, validate
from dist_train.tasks.losses import make_loss
from dist_train.train.evaluator import Evaluator
from dist_train.train.logging import start_lines
from dist_train.train.overfit import falls_to_floor, overfit, reachable_floor
from dist_train.train.results import compact_line, done_line, epoch_table
from dist_train.train.trainer import Trainer

BASE = dict(model="test_resnet", img_size=32, batch_size=8, lr=0.01, seed=0, warmup_epochs=0.0, epochs=1, workers=0,
            plots=False)
ARGS = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--lr", "0.01", "--seed", "0",
        "--warmup-epochs", "0", "--workers", "0", "--log-with", "none"]


def make_cfg(shards: Path, out: Path | None, **kw) -> Config:
    return validate(Config.from_flat({**BASE, "data": str(shards), "output": None if out is None else str(out), **kw}))


# ----------------------------------------------------------------------------- overfit verdict
def test_floor_is_what_the_loss_can_reach():
    """Cross-entropy with smoothing s over C classes cannot go below the smoothed target's entropy."""
    y = [torch.tensor([0, 3, 5, 17, 2, 2, 9, 11])]
    s, c = 0.1, 18
    hi, lo = 1 - s + s / c, s / c
    entropy = -(hi * math.log(hi) + (c - 1) * lo * math.log(lo))
    assert entropy == pytest.approx(0.580, abs=1e-3)
    assert reachable_floor(make_loss("ce", c, smoothing=s), y, c) == pytest.approx(entropy, abs=2e-3)
    assert reachable_floor(make_loss("ce", c), y, c) < 0.02
    assert 0 < reachable_floor(make_loss("focal", c, smoothing=s), y, c) < entropy  # focal's own floor
    # the numbers: 2.97 -> 0.60 with a floor of 0.58 is a healthy fall; 2.97 -> 2.90 is not
    assert falls_to_floor(2.97, 0.60, 0.58) and not falls_to_floor(2.97, 0.60, 0.0)
    assert not falls_to_floor(2.97, 2.90, 0.58)


def test_overfit_verdict_of_a_model_that_cannot_learn(mask_shards, capsys):
    """LR 1e-12 with smoothing 0.1: the negative verdict (the healthy model's positive one with
    smoothing 0.1 is test_train.py's test_overfit_batches)."""
    broken = overfit(make_cfg(mask_shards, None, overfit_batches=2, max_steps=10, lr=1e-12, smoothing=0.1))
    assert not broken["overfit_ok"] and "does NOT fall toward the floor" in capsys.readouterr().out


# ----------------------------------------------------------------------------- --debug
class Counting:
    """Counts the batches drawn from a loader (everything else is the loader's)."""

    def __init__(self, loader) -> None:
        self.loader, self.batches = loader, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.batches += 1
            yield batch


def test_debug_runs_debug_steps_train_and_val_batches(mask_shards, tmp_path):
    """--debug with the default 10 epochs: 3 train batches, then one validation of 3 batches, and done."""
    calls = []

    def criterion(out, y):
        calls.append(1)
        return torch.nn.functional.cross_entropy(out, y)

    class Counted(Trainer):
        def build_val_loader(self):
            self.counted = Counting(super().build_val_loader())
            return self.counted

    t = Counted(make_cfg(mask_shards, tmp_path / "run", debug=True, debug_steps=3, epochs=10), criterion=criterion)
    result = t.train()
    assert len(calls) == 3 and result["step"] == 3 and t.batches_seen == 3
    assert t.counted.batches == 3  # not one batch more is read than --debug-steps
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())] == [3]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"] is True


def test_debug_on_an_epoch_shorter_than_debug_steps_is_one_epoch_and_one_validation(mask_shards, tmp_path):
    """Batch 64: an epoch is 3 batches, fewer than --debug-steps 5. The run went on into the next
    epoch (a second validation) and stopped mid-epoch at step 5, its last steps never validated."""
    t = Trainer(make_cfg(mask_shards, tmp_path / "run", debug=True, debug_steps=5, epochs=10, batch_size=64))
    result = t.train()
    assert result["step"] == t.batches == 3 and result["epoch"] == 1
    assert [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())] == [3]


# ----------------------------------------------------------------------------- best epoch, results, report
def test_done_line_summary_and_results_name_the_best_evaluation(mask_shards, tmp_path, monkeypatch):
    """Scripted val macro F1 0.3, 0.5, 0.2 at steps 2, 4, 6: the done line, summary.json, best/,
    results.csv and the table all name step 4, not the last evaluation."""
    real, scores = Evaluator.metrics, iter([0.3, 0.5, 0.2])

    def scripted(self, model, acc, write_confusion=True):
        m = real(self, model, acc, write_confusion)
        m["val_macro_f1"] = self._latest["macro_f1"] = next(scores)
        return m

    monkeypatch.setattr(Evaluator, "metrics", scripted)
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *ARGS, "--max-steps", "6", "--eval-every", "2",
                  "--plots"])
    assert p.returncode == 0, p.stderr[-3000:]
    done = [line for line in p.stdout.splitlines() if line.startswith("done:")]
    assert done == [f"done: step 6 (0 epochs completed); best val macro F1 0.5000 (acc "
                    f"{json.loads((out / 'best' / 'metrics.json').read_text())['val_acc']:.4f}) at epoch 0, step 4, "
                    f"in {out}/best"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True and summary["best_val_macro_f1"] == 0.5
    assert summary["best"]["step"] == 4 and summary["best"]["epoch"] == 0 and summary["best"]["weights"] == "model"
    assert json.loads((out / "best" / "metrics.json").read_text())["val_macro_f1"] == 0.5

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["val_macro_f1"], r["best"]) for r in rows] == [("2", "0.3", "0"), ("4", "0.5", "1"),
                                                                         ("6", "0.2", "0")]
    assert {"train_loss_configured", "val_loss_ce", "val_acc", "lr", "interval_s"} <= set(rows[0])
    # the console: one short line per evaluation, then the table with the best row marked
    lines = p.stdout.splitlines()
    evals = [line for line in lines if line.startswith("epoch 0 step ")]
    assert len(evals) == 3 and all(len(line) < 200 for line in evals) and "*best" in evals[1]
    assert "train loss (CE, smoothing 0.1)" in evals[0] and "val CE" in evals[0]
    marked = [line for line in lines if line.startswith("*")]
    assert len(marked) == 1 and marked[0].split()[1:3] == ["0", "4"]
    # report.png of the best evaluation, drawn at the end of training
    assert (out / "report.png").is_file() and f"report: {out}/report.png" in p.stdout


def test_max_steps_before_any_evaluation_reports_none(mask_shards, tmp_path):
    """No evaluation ran: no -1.0 anywhere, and the done line says so."""
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *ARGS, "--max-steps", "2", "--plots"])
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True and summary["best_val_macro_f1"] is None and summary["best"] is None
    assert "done: step 2 (0 epochs completed); no evaluation yet" in p.stdout
    assert "report.png: not drawn (nothing was evaluated" in p.stdout and not (out / "report.png").exists()


def test_no_plots_writes_the_files_without_pictures(mask_shards, tmp_path):
    """--no-plots: confusion.csv and every JSON/CSV file as usual, no confusion.png, no report.png."""
    out = tmp_path / "run"
    p = run_main(["--data", str(mask_shards), "--output", str(out), *ARGS, "--max-steps", "2", "--eval-every", "2",
                  "--no-plots"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "confusion.csv").is_file() and (out / "results.csv").is_file() and (out / "best").is_dir()
    assert not (out / "confusion.png").exists() and not (out / "report.png").exists()
    assert "report.png: not drawn (--no-plots)" in p.stdout and "plots: false" in (out / "config.yaml").read_text()


def test_compact_line_and_table_formats():
    m = {"epoch": 2, "step": 60, "lr": 5.6e-06, "train_loss": 2.077, "val_loss": 2.099, "val_acc": 0.4048,
         "val_macro_f1": 0.1422, "images_per_s": 120.6, "interval_s": 2.7, "train_class_counts": list(range(18))}
    best = {"epoch": 2, "step": 60, "weights": "model", "val_macro_f1": 0.1422, "val_acc": 0.4048}
    line = compact_line(m, "CE, smoothing 0.1", best)
    assert line == ("epoch 2 step 60 | train loss (CE, smoothing 0.1) 2.0770 | val CE 2.0990 F1 0.1422 acc 0.4048 "
                    "*best | lr 5.60e-06 | 121 img/s | 3s")
    assert "| 121 img/s (data wait 37%) | 3s" in compact_line({**m, "data_wait": 0.372}, "CE", best)
    rows = [{**m, "step": s} for s in range(1, 41)]  # 40 evaluations, the best the third
    table = epoch_table(rows, "CE", {**best, "step": 3}).splitlines()
    assert len(table) == 32 and table[1].startswith("*") and "10 earlier evaluations in results.csv" in table[-1]
    no_val = done_line({"step": 21, "epoch": 1, "output": "runs/x",
                        "best": {"epoch": 0, "step": 21, "weights": "ema"}})
    assert no_val == "done: step 21 (1 epoch completed); no validation split: runs/x/best holds the weights of epoch 0 " \
                     "(EMA weights)"


# ----------------------------------------------------------------------------- start summary
def fake_acc(world: int) -> SimpleNamespace:
    return SimpleNamespace(num_processes=world, distributed_type=SimpleNamespace(value="MULTI_CPU"), device="cpu",
                           mixed_precision="no")


@pytest.mark.parametrize("world, workers, words", [
    (2, 1, "64 shards; 2 ranks x 1 worker each; rank 0's readers read from 37 of the 64 shards"),
    (2, 0, "2 ranks x 0 workers (loading in the main process); rank 0's readers read from 37 of the 64 shards"),
    (1, 0, "1 rank x 0 workers (loading in the main process)\n"),
    (1, 4, "1 rank x 4 workers each; rank 0's readers read from 37"),
])
def test_start_summary_counts(world, workers, words):
    facts = dict(model="m", weights="randomly initialised", params=10, trainable=10, global_batch=16, batches=5,
                 steps_per_epoch=5, train_samples=80, shards=64, shards_per_rank=37, workers=workers, output="o")
    assert words in start_lines(fake_acc(world), facts)


def test_start_summary_says_where_the_weights_come_from(mask_shards, tmp_path):
    import timm
    from safetensors.torch import save_file

    from dist_train.model.build import describe_weights

    assert describe_weights("test_resnet", 18, pretrained=False, pretrained_path=None).startswith("randomly initialised")
    hub = describe_weights("test_resnet", 18, pretrained=True, pretrained_path=None)
    assert "timm hub (test_resnet.r160_in1k)" in hub and "classifier replaced: a new 18-class one" in hub
    for classes, words in ((1000, "classifier replaced: a new 18-class one, random init (the weights had 1000"),
                           (18, "classifier kept (18 classes)"), (0, "(the weights had none)")):
        file = tmp_path / f"w{classes}.safetensors"
        save_file(timm.create_model("test_resnet", num_classes=classes).state_dict(), str(file))
        assert words in describe_weights("test_resnet", 18, pretrained=False, pretrained_path=str(file))
    assert "multi head is new" in describe_weights("test_resnet", 18, pretrained=True, pretrained_path=None,
                                                   head="multi")
    p = run_main(["--data", str(mask_shards), "--output", str(tmp_path / "run"), *ARGS, "--max-steps", "1",
                  "--pretrained-path", str(tmp_path / "w1000.safetensors")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"weights from {tmp_path}/w1000.safetensors; classifier replaced" in p.stdout


# ----------------------------------------------------------------------------- trackers every N steps
def test_trackers_get_train_loss_and_lr_every_log_every_steps(mask_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(make_cfg(mask_shards, out, max_steps=6, log_every=2, val_split="none", log_with="tensorboard")).train()
    acc = EventAccumulator(str(out / "tb" / "dist_train"), size_guidance={"scalars": 0})
    acc.Reload()
    losses, lrs = acc.Scalars("train_loss_step"), acc.Scalars("lr_step")
    assert [e.step for e in losses] == [2, 4, 6] and [e.step for e in lrs] == [2, 4, 6]
    assert all(0 < e.value < 10 for e in losses) and all(e.value > 0 for e in lrs)


def test_data_wait_is_the_share_of_time_spent_waiting_for_batches():
    """Meter.timed counts the wall time of each `next` on the loader, none of the loop's own."""
    import time

    from accelerate import Accelerator

    from dist_train.train.logging import Meter

    def slow_loader():
        for i in range(5):
            time.sleep(0.03)  # the loader's time per batch
            yield i

    meter = Meter(torch.device("cpu"), 2)
    for _ in meter.timed(slow_loader()):
        time.sleep(0.01)  # the training step's
    assert 0.5 < meter.data_wait(Accelerator(cpu=True)) < 0.9  # 30 of 40 ms
    meter.reset()
    assert meter.wait_s == 0.0


@pytest.mark.parametrize("asked, native, shown", [
    ("fp16", False, "no (fp16 was asked, but Accelerate has no fp16 autocast on cpu: the steps run in fp32"),
    ("bf16", True, "bf16"), ("no", False, "no")])
def test_start_line_says_the_precision_the_steps_run_in(asked, native, shown):
    """`--mixed-precision fp16` on the CPU: Accelerate keeps `mixed_precision == "fp16"` but has no
    fp16 autocast there (native_amp False) and trains in fp32, bit for bit the fp32 run; the
    start line said `precision fp16`. (A real Accelerator here would pin the process's
    AcceleratorState to fp16 for every later in-process run.)"""
    from dist_train.train.logging import precision_used

    acc = SimpleNamespace(mixed_precision=asked, native_amp=native, device=torch.device("cpu"))
    assert precision_used(acc).startswith(shown)


def test_a_resume_drops_the_evaluations_past_its_checkpoint_from_metrics_jsonl(tmp_path):
    """kill -9 after the evaluations at steps 12 and 14, with the newest checkpoint at step 10:
    the resumed run makes them again. metrics.jsonl listed them twice (results.csv and the table
    did not); now it keeps the lines up to the checkpoint (a torn last line dropped too)."""
    from dist_train.train.results import Results

    lines = [json.dumps({"epoch": 0, "step": s, "val_macro_f1": s / 100}) for s in (5, 10, 12, 14)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 0, "st')
    results = Results(SimpleNamespace(is_main_process=True), tmp_path, "CE", since_step=10)
    assert [r["step"] for r in results.rows] == [5, 10]
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    Results(SimpleNamespace(is_main_process=True), tmp_path, "CE", since_step=10)  # nothing past it: as it was
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
