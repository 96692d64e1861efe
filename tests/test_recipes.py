"""The competition recipe as options: multi-head, age bins and relabelling at load time, losses, mixup."""

from __future__ import annotations

import json

import pytest

from dist_train import labels as L
from test_train import BASE, run_py


@pytest.mark.parametrize("extra", [
    ["--head", "multi"],
    ["--age-bins", "30,58"],
    ["--loss", "focal", "--class-weights", "auto"],
    ["--loss", "f1"],
    ["--mixup", "0.2", "--cutmix", "1.0"],
    ["--crop", "center", "--reprob", "0.25", "--aa", "rand-m9-mstd0.5"],
    ["--grad-accum-steps", "2", "--clip-grad", "1.0", "--opt", "sgd", "--sched", "step"],
])
def test_recipe_option_trains(mask_shards, tmp_path, extra):
    out = tmp_path / "run"
    p = run_py(["--data", str(mask_shards), "--output", str(out), *BASE, "--epochs", "1", "--workers", "0",
                "--max-steps", "3", "--eval-every", "3", *extra])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["train_loss"] == rows[-1]["train_loss"]  # not NaN


def test_relabel_and_age_bins_at_load_time(tmp_path):
    fixes_csv = tmp_path / "fix.csv"
    fixes_csv.write_text("id,gender,age,swap_mask\n000001,female,,\n000002,,61,\n000003,,,1\n")
    fixes = L.load_relabel(str(fixes_csv))
    base = {"person_id": "000001", "gender": 0, "age": 58, "mask": 1}
    assert L.target_from_meta(base, None) == L.encode(1, 0, 1)  # no fixes: as stored
    assert L.target_from_meta(base, None, fixes=fixes) == L.encode(1, 1, 1)  # gender fixed to female
    assert L.target_from_meta(base, None, bins=(30, 58), fixes=fixes) == L.encode(1, 1, 2)  # 58 is old with 30,58
    assert L.target_from_meta({**base, "person_id": "000002"}, None, fixes=fixes) == L.encode(1, 0, 2)
    assert L.target_from_meta({**base, "person_id": "000003"}, None, fixes=fixes) == L.encode(2, 0, 1)  # swapped
    assert L.target_from_meta({**base, "person_id": "000003", "mask": 0}, None, fixes=fixes) == L.encode(0, 0, 1)


def test_relabel_bad_file(tmp_path):
    from dist_train.errors import UserError

    bad = tmp_path / "bad.csv"
    bad.write_text("id,gender\n000001,robot\n")
    with pytest.raises(UserError, match="line 2"):
        L.load_relabel(str(bad))
    with pytest.raises(UserError, match="cannot read"):
        L.load_relabel(str(tmp_path / "missing.csv"))
