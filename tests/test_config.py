"""Every number of the config is checked, whether it came from a flag or from YAML: its type,
finite, in its range; one line naming the flag, the value and the range (issue 20)."""

from __future__ import annotations

import math

import pytest

from dist_train.config import Config, parse_config, validate
from dist_train.config.ranges import RANGES, TYPES, max_workers
from dist_train.errors import UserError


def error_of(argv: list[str]) -> str:
    with pytest.raises(UserError) as e:
        parse_config(["--data", "x", *argv])
    return str(e.value)


@pytest.mark.parametrize("argv, line", [
    (["--lr", "nan"], "--lr nan: expected a finite number > 0"),
    (["--lr", "inf"], "--lr inf: expected a finite number > 0"),
    (["--lr", "0"], "--lr 0.0: expected a finite number > 0"),
    (["--seed", "-1"], "--seed -1: expected an integer in 0..4294967295"),
    (["--seed", str(2**32)], f"--seed {2**32}: expected an integer in 0..4294967295"),
    (["--smoothing", "2"], "--smoothing 2.0: expected a finite number >= 0 and < 1"),
    (["--smoothing", "1"], "--smoothing 1.0: expected a finite number >= 0 and < 1"),
    (["--drop", "5"], "--drop 5.0: expected a finite number >= 0 and < 1"),
    (["--drop-path", "1"], "--drop-path 1.0: expected a finite number >= 0 and < 1 (or none)"),
    (["--weight-decay", "-0.1"], "--weight-decay -0.1: expected a finite number >= 0"),
    (["--clip-grad", "inf"], "--clip-grad inf: expected a finite number > 0 (or none)"),
    (["--mixup", "-1"], "--mixup -1.0: expected a finite number >= 0"),
    (["--cutmix", "nan"], "--cutmix nan: expected a finite number >= 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs -1.0: expected a finite number >= 0"),
    (["--momentum", "1.5"], "--momentum 1.5: expected a finite number >= 0 and < 1"),
    (["--model-ema-decay", "1"], "--model-ema-decay 1.0: expected a finite number >= 0 and < 1"),
    (["--epochs", "0"], "--epochs 0: expected an integer in 1..2147483647"),
    (["--batch-size", "0"], "--batch-size 0: expected an integer in 1..1048576"),
    (["--img-size", "-32"], "--img-size -32: expected an integer in 1..8192"),
    (["--ratio", "1", "inf"], "--ratio 1.0 inf: expected finite numbers 0 < MIN <= MAX"),
    (["--scale", "nan", "1"], "--scale nan 1.0: expected 0 < MIN <= MAX <= 1"),
    (["--vflip", "1.5"], "--vflip 1.5: expected a finite number >= 0 and <= 1"),
    (["--color-jitter", "-0.1"], "--color-jitter -0.1: expected a finite number >= 0 and <= 1"),
    (["--color-jitter", "0.4", "--aa", "rand-m9-mstd0.5"], "--color-jitter 0.4 with --aa rand-m9-mstd0.5: timm "
     "applies one or the other (its auto-augment policies vary colour themselves); pass one of them"),
])
def test_flag_out_of_range_is_one_line(argv, line):
    assert error_of(argv) == line


def test_workers_bound_is_tied_to_the_machine():
    n = max_workers()
    assert n >= 8
    assert parse_config(["--data", "x", "--workers", str(n)]).data.workers == n
    line = error_of(["--workers", "1000"] if n < 1000 else ["--workers", str(n + 1)])
    assert line.startswith("--workers ") and f"expected an integer in 0..{n} (4 per usable CPU core" in line
    assert "at least 8" in line


def _bad_values(name: str) -> list:
    """Values outside `name`'s range: below, above, not finite, and of the wrong type."""
    r = RANGES[name]
    out: list = [math.nan, "abc", [1]] if not r.integer else [1.5, "abc", True]
    if r.lo is not None:
        out.append(r.lo if r.lo_open else r.lo - 1)
    if r.hi is not None:
        out.append(r.hi if r.hi_open else r.hi + 1)
    elif not r.integer:
        out.append(math.inf)
    return out


CASES = [(name, v) for name in sorted(RANGES) if name != "workers" for v in _bad_values(name)]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_every_numeric_field_is_checked_from_yaml(name, value, tmp_path):
    """The same value written in a config.yaml (someone else's, perhaps) is refused with one
    line naming the key's flag and the value, whatever its type."""
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({name: value}))
    line = error_of(["--config", str(path)])
    assert line.startswith(f"--{name.replace('_', '-')} "), line
    assert "expected" in line and "\n" not in line


@pytest.mark.parametrize("name", sorted(n for n, t in TYPES.items() if t.split(" ")[0] in ("str", "bool")
                                          and n not in ("data",)))
def test_every_other_field_is_type_checked(name):
    """Strings and switches given as lists (YAML) are one line too, not a crash later."""
    with pytest.raises(UserError, match=rf"^--{name.replace('_', '-')} \[1, 2\]: expected"):
        validate(Config.from_flat({"data": "x", name: [1, 2]}))


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    """YAML reads `lr: 1e-3` as a string: it is the number users meant."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-2\nepochs: 3\n")
    cfg = parse_config(["--config", str(path), "--data", "x"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.05 and cfg.optim.epochs == 3


def test_defaults_and_the_edges_of_each_range_are_accepted():
    cfg = parse_config(["--data", "x", "--seed", str(2**32 - 1), "--smoothing", "0", "--drop", "0.99",
                        "--hflip", "1", "--max-bad-fraction", "0", "--crop-pct", "1", "--workers", "0"])
    assert cfg.runtime.seed == 2**32 - 1 and cfg.task.smoothing == 0


def test_a_mistyped_key_or_flag_gets_the_nearest_real_one(tmp_path):
    """`img_sise: 32` in the YAML or `--img-sise 32` said only `unknown key` / `unrecognized
    arguments`; a name nothing resembles still gets no guess."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("img_sise: 32\n")
    assert "unknown key 'img_sise' (did you mean img_size? see" in error_of(["--config", str(cfg)])
    assert error_of(["--img-sise", "32", "--modl-ema", "--epochs=2"]).startswith(
        "unrecognized arguments: --img-sise 32 --modl-ema (did you mean --img-sise -> --img-size, "
        "--modl-ema -> --model-ema?) (see")
    cfg.write_text("colour: red\n")
    assert "unknown key 'colour' (see" in error_of(["--config", str(cfg)])
