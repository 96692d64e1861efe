"""What a person reads about a run's evaluations: one compact console line per evaluation,
`results.csv` (one row per evaluation, rewritten whole each time), the table of evaluations at
the end of training and the `done:` line naming the best one.

The full record of each evaluation stays in `metrics.jsonl` (its field names unchanged):
`train_loss` there is the configured loss (`--loss` with `--smoothing`, class weights, Mixup /
CutMix targets, the task's head), averaged over the steps since the previous evaluation;
`val_loss` is plain cross-entropy of the validation predictions against the hard labels. Here
they are named for what they are: `train_loss_configured` and `val_loss_ce` in results.csv,
"train loss (CE, smoothing 0.1)" and "val CE" on the console.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from tqdm.auto import tqdm

from dist_train.config import Config
from dist_train.errors import atomic_write_text

from .checkpoint import Progress
from .trackers import flat_metrics

LOSS_NAMES = {"ce": "CE", "focal": "focal", "f1": "soft macro-F1"}
# results.csv column -> metrics.jsonl field, in this order; the task's own val_* scalars follow
COLUMNS = [("epoch", "epoch"), ("step", "step"), ("interval_s", "interval_s"), ("lr", "lr"),
           ("train_loss_configured", "train_loss"), ("val_loss_ce", "val_loss"), ("val_acc", "val_acc"),
           ("val_macro_f1", "val_macro_f1"), ("val_loss_ce_ema", "val_loss_ema"), ("val_acc_ema", "val_acc_ema"),
           ("val_macro_f1_ema", "val_macro_f1_ema")]
TAIL = [("images_per_s", "images_per_s"), ("data_wait", "data_wait"), ("bad_samples", "bad_samples"), ("stage", "stage")]
STOP_LINES = {
    "signal": "dist_train: stopped by signal at step {step}; checkpoint saved, continue with --resume auto",
    "time-limit": "dist_train: stopped at step {step} to stay within --time-limit {limit}; checkpoint saved, "
                  "continue with --resume auto",
    "patience": "dist_train: early stop at step {step}: val macro F1 has not improved for {stale} evaluations "
                "(best {best:.4f}, --patience); checkpoint saved",
}
TABLE_ROWS = 30  # more evaluations than this: the table shows the best one and the last ones


def loss_label(cfg: Config) -> str:
    """What `train_loss` measures, in words: `CE, smoothing 0.1, Mixup/CutMix targets`."""
    t, a = cfg.task, cfg.augment
    parts = [LOSS_NAMES.get(t.loss, t.loss)]
    if t.smoothing:
        parts.append(f"smoothing {t.smoothing:g}")
    if t.class_weights:
        parts.append("class-weighted")
    if a.mixup > 0 or a.cutmix > 0:
        parts.append("Mixup/CutMix targets")
    if t.head != "single":
        parts.append(f"{t.head} head")
    return ", ".join(parts)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compact_line(m: dict, label: str, best: dict | None) -> str:
    """One evaluation in ~120 characters; `*` marks a new best."""
    parts = [f"epoch {m['epoch']} step {m['step']}", f"train loss ({label}) {m['train_loss']:.4f}"]
    if "val_macro_f1" in m:
        val = f"val CE {m['val_loss']:.4f} F1 {m['val_macro_f1']:.4f} acc {m['val_acc']:.4f}"
        if "val_macro_f1_ema" in m:
            val += f" (EMA: F1 {m['val_macro_f1_ema']:.4f} acc {m['val_acc_ema']:.4f})"
        if best is not None and best.get("step") == m["step"] and "val_macro_f1" in best:
            val += " *best"
        parts.append(val)
    parts += [f"lr {m['lr']:.2e}", f"{m['images_per_s']:.0f} img/s"
              + (f" (data wait {m['data_wait']:.0%})" if "data_wait" in m else ""), f"{m.get('interval_s', 0.0):.0f}s"]
    return " | ".join(parts)


def results_csv(rows: list[dict], best: dict | None) -> str:
    """results.csv: one row per evaluation, scalar fields only, `best` = 1 on the best one."""
    extra = sorted({k for r in rows for k, v in r.items() if k.startswith("val_") and _num(v)}
                   - {src for _, src in COLUMNS} - {"val_samples"})
    cols = [(c, s) for c, s in COLUMNS if any(s in r for r in rows)] + [(k, k) for k in extra]
    cols += [(c, s) for c, s in TAIL if any(s in r for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c for c, _ in cols] + ["best"])
    best_step = (best or {}).get("step") if (best or {}).get("val_macro_f1") is not None else None
    for r in rows:
        w.writerow([f"{r[s]:.6g}" if isinstance(r.get(s), float) else r.get(s, "") for _, s in cols]
                   + [int(r.get("step") == best_step)])
    return buf.getvalue()


def _fmt(v: Any, spec: str, width: int) -> str:
    return f"{v:{width}{spec}}" if _num(v) and math.isfinite(v) else f"{'-':>{width}}"


def epoch_table(rows: list[dict], label: str, best: dict | None) -> str:
    """The evaluations as an aligned table, the best marked with `*` (at most TABLE_ROWS rows)."""
    best_step = (best or {}).get("step") if (best or {}).get("val_macro_f1") is not None else None
    shown = rows
    if len(rows) > TABLE_ROWS:
        shown = rows[-(TABLE_ROWS - 1):]
        shown = [r for r in rows if r.get("step") == best_step and r not in shown] + shown
    lines = [f"  {'epoch':>5} {'step':>7} {'train loss':>10} {'val CE':>8} {'val F1':>7} {'val acc':>7} "
             f"{'lr':>9} {'time':>7}"]
    for r in shown:
        mark = "*" if r.get("step") == best_step else " "
        lines.append(f"{mark} {r.get('epoch', '-'):>5} {r.get('step', '-'):>7} {_fmt(r.get('train_loss'), '.4f', 10)} "
                     f"{_fmt(r.get('val_loss'), '.4f', 8)} {_fmt(r.get('val_macro_f1'), '.4f', 7)} "
                     f"{_fmt(r.get('val_acc'), '.4f', 7)} {_fmt(r.get('lr'), '.2e', 9)} "
                     f"{_fmt(r.get('interval_s'), '.1f', 6)}s")
    note = f"train loss: {label} (the configured loss); val CE: plain cross-entropy; time: since the previous row"
    if best_step is not None:
        note += "; * best val macro F1"
    if len(shown) < len(rows):
        note += f"; {len(rows) - len(shown)} earlier evaluations in results.csv"
    return "\n".join(lines + [f"  ({note})"])


def best_text(best: dict | None, out: str | Path) -> str:
    """The best evaluation in words (the `done:` line's and summary's part)."""
    if not best:
        return "no evaluation yet (add --eval-every N to evaluate before an epoch ends)"
    weights = " (EMA weights)" if best.get("weights") == "ema" else ""
    if best.get("val_macro_f1") is None:  # no validation split
        return f"no validation split: {out}/best holds the weights of epoch {best['epoch']}{weights}"
    return (f"best val macro F1 {best['val_macro_f1']:.4f} (acc {best['val_acc']:.4f}) at epoch {best['epoch']}, "
            f"step {best['step']}{weights}, in {out}/best")


def done_line(result: dict) -> str:
    """`done: step 63 (3 epochs completed); best val macro F1 0.1422 (acc 0.4048) at epoch 2, ...`"""
    epochs = result["epoch"]
    return (f"done: step {result['step']} ({epochs} epoch{'' if epochs == 1 else 's'} completed); "
            f"{best_text(result.get('best'), result['output'])}")


def run_finished(p: Progress, cfg: Config) -> bool:
    """The run reached its end: --epochs, --max-steps, or --patience evaluations without a better
    val macro F1 (summary.json's `finished`); --debug: one epoch of at most --debug-steps batches
    (an epoch of fewer batches went on to the next, validated each, and stopped mid-epoch)."""
    o, r = cfg.optim, cfg.runtime
    return (p.epoch >= o.epochs or bool(r.max_steps and p.step >= r.max_steps)
            or bool(r.patience and p.stale >= r.patience) or (r.debug and p.epoch >= 1))


def finished_already(acc: Accelerator, p: Progress, cfg: Config, ckpt: Path) -> dict:
    """--resume of a run that reached its end: one line, nothing trained or written (a finished
    run resumed again used to rewrite summary.json, and train one more epoch past --patience)."""
    if acc.is_main_process:
        stale = cfg.runtime.patience and p.stale >= cfg.runtime.patience
        why = f"; {p.stale} evaluations without a better val macro F1, --patience {cfg.runtime.patience}" if stale else ""
        print(f"dist_train: {cfg.checkpoint.output} is finished already ({ckpt.name}: {p.epoch} epochs completed{why}): "
              "nothing to resume, nothing written; raise --epochs, --max-steps or --patience to train on", flush=True)
    return {"step": p.step, "epoch": p.epoch, "best": p.best, "output": str(cfg.checkpoint.output), "stopped": True,
            "is_main": acc.is_main_process}


def stop_line(why: str, progress: Progress, time_limit: str | None) -> str:
    return STOP_LINES[why].format(step=progress.step, stale=progress.stale, best=progress.best_f1, limit=time_limit)


class Results:
    """Each evaluation: a line in `metrics.jsonl`, results.csv rewritten, one compact console line
    (main process), every field to the trackers. `since_step`: a resumed run's step; earlier
    evaluations come from metrics.jsonl (lines past it were lost with their checkpoint and are
    evaluated again)."""

    def __init__(self, acc: Accelerator, out: Path, label: str, since_step: int = 0) -> None:
        self.acc, self.out, self.label = acc, Path(out), label
        self.path = self.out / "metrics.jsonl"
        self.rows = self._earlier(since_step) if acc.is_main_process and since_step else []
        self.last = time.monotonic()

    def _earlier(self, since_step: int) -> list[dict]:
        """The evaluations up to the checkpoint resumed; metrics.jsonl is rewritten without the
        others (a torn line, evaluations past the checkpoint: made again, they were listed twice)."""
        rows, lines = [], []
        if self.path.is_file():
            lines = self.path.read_text(errors="replace").splitlines()
            for line in lines:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a torn last line
                if isinstance(r, dict) and _num(r.get("step")) and r["step"] <= since_step:
                    rows = [x for x in rows if x.get("step") != r["step"]] + [r]
        if len(rows) != len(lines):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def write(self, m: dict, step: int, best: dict | None) -> None:
        now = time.monotonic()
        m["interval_s"], self.last = now - self.last, now
        if self.acc.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(m) + "\n")
            self.rows.append(m)
            atomic_write_text(self.out / "results.csv", results_csv(self.rows, best))
            tqdm.write(compact_line(m, self.label, best))
        self.acc.log(flat_metrics(m), step=step)

    def table(self, best: dict | None) -> str:
        return epoch_table(self.rows, self.label, best)
