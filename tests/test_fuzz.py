"""The fuzz suite (issue 20): crafted files of every class the issue names, and property-based
mutation (hypothesis) of valid `_info.json`, tars, `progress.json`, `config.yaml`, `best/` files
and `.probs.npz`, run through the commands that read them. Every run must end in success or in
exactly one `error:` line with exit 1 or 2, with no traceback, nothing created or removed outside
its output, no command read from a file run, and (the bomb cases, in a subprocess under
RLIMIT_AS) bounded memory. Commands run in this process (their `main(argv)`); the valid base
files are built once per module (tests/fuzz_corpus.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import ROOT, run_main
from dist_train import calibrate, checkpoint, ensemble, evaluate, export, oof, predict, shard, suspects
from fuzz_corpus import (Case, Outcome, build_base, call, call_reader, contract, gzipped, jpeg_declaring,
                         nested_json, npz_bomb, pipe_address, safetensors_with_header, tar_bytes,
                         tar_member_declaring, tar_with_link, tree)

# No shrinking: a failing example is reported as found (derandomized, so CI finds the same one),
# and a failing property costs no more time than a passing one.
FUZZ = settings(deadline=None, max_examples=20, derandomize=True, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
CKPT = "checkpoints/step-00000004"
TRAIN = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "4", "--workers", "0", "--seed", "0",
         "--warmup-epochs", "0", "--log-with", "none", "--model-ema"]  # as fuzz_corpus.build_base trained


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    return build_base(tmp_path_factory.mktemp("fuzz_base"))


# ----------------------------------------------------------------------------- commands
def run_py(argv: list[str]) -> None:
    p = run_main(argv)
    sys.stderr.write(p.stderr)
    if p.returncode:
        raise SystemExit(p.returncode)


def command(name: str, d: Path, base: dict) -> tuple[Outcome, tuple[Path, ...]]:
    """Run command `name` on the case folder `d` (shards/, run/, cv/, probs.npz as the case made
    them, else the base's); -> the outcome and the paths it may write."""
    s = d / "shards" if (d / "shards").exists() else base["shards"]
    r = d / "run" if (d / "run").exists() else base["run"]
    cv = d / "cv" if (d / "cv").exists() else base["cv"]
    probs = d / "x.probs.npz" if (d / "x.probs.npz").exists() else base["probs"]
    out = d / "out"
    out.mkdir(exist_ok=True)
    loader = ["--workers", "0", "--batch-size", "8"]
    argv = {
        "inspect": (shard.main, ["--inspect", str(s)]),
        "verify": (checkpoint.main, ["--verify", str(r)]),
        "resume": (run_py, ["--data", str(s), "--output", str(r), "--resume", "auto", "--epochs", "2", *TRAIN]),
        "train": (run_py, ["--data", str(s), "--output", str(out / "run"), "--epochs", "1", *TRAIN]),
        "predict": (predict.main, ["--run", str(r), "--data", str(s), "--split", "train", "--out", str(out / "p.csv"),
                                   *loader]),
        "evaluate": (evaluate.main, ["--run", str(r), "--data", str(s), "--out", str(out), *loader]),
        "export": (export.main, ["--run", str(r), "--format", "torchscript", "--out", str(out / "m.pt")]),
        "oof": (oof.main, [str(cv), *loader]),
        "suspects": (suspects.main, [str(cv), "--out", str(out / "s.csv")]),
        "calibrate": (calibrate.main, [str(probs), "--out", str(out / "c.json")]),
        "ensemble": (ensemble.main, ["--out", str(out / "e.csv"), str(probs), str(probs)]),
        "shard": (shard.main, ["--src", str(d / "src" if (d / "src").exists() else base["src"]), "--out",
                               str(d / "shards"), "--workers", "1", "--quiet", "--samples-per-shard", "4"]),
    }[name]
    outputs = (out, r / "eval-validation", cv / "oof.csv", cv / "oof.probs.npz", cv / "oof.json", d / "shards")
    if name == "resume":
        outputs += (r,)
    return call(*argv), outputs


def check_case(name: str, d: Path, base: dict, codes=(0, 1, 2), must_fail: bool = False,
               not_in_out: str | None = None) -> None:
    canary = d / "CANARY"
    before = tree(d, base["shards"].parent)
    o, outputs = command(name, d, base)
    problems = contract(o, before, tree(d, base["shards"].parent), outputs, codes=codes, canary=canary)
    if must_fail and o.code == 0:
        problems.append(f"accepted (exit 0): expected a refusal\n{o.out[-1500:]}")
    if not_in_out is not None and not_in_out in o.out:
        problems.append(f"says {not_in_out!r}:\n{o.out[-1500:]}")
    assert not problems, f"{name}: " + "\n".join(problems)


def copy(base: dict, d: Path, *what: str) -> None:
    for w in what:
        src = base[w]
        if src.is_dir():
            shutil.copytree(src, d / w, symlinks=True)
        else:
            shutil.copy2(src, d / "x.probs.npz")


def edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)  # changes it in place
    path.write_text(json.dumps(doc))


def reseal(shards: Path) -> None:
    """Recompute `_info.json`'s checksums after a tar changed: the attacker can, so the tars
    themselves must be checked, not only their hashes."""
    import hashlib

    info = json.loads((shards / "_info.json").read_text())
    info["sha256"] = {n: hashlib.sha256((shards / n).read_bytes()).hexdigest() for n in info.get("sha256", {})
                      if (shards / n).is_file()}
    (shards / "_info.json").write_text(json.dumps(info))


# ----------------------------------------------------------------------------- crafted corpus
def _info(fn):
    def make(d: Path, base: dict) -> None:
        copy(base, d, "shards")
        edit_json(d / "shards" / "_info.json", fn)
    return make


def _info_text(text: str):
    def make(d: Path, base: dict) -> None:
        copy(base, d, "shards")
        (d / "shards" / "_info.json").write_text(text)
    return make


def _tar(name: str, data_fn):
    def make(d: Path, base: dict) -> None:
        copy(base, d, "shards")
        (d / "shards" / name).write_bytes(data_fn(d / "shards" / name))
        reseal(d / "shards")
    return make


def _escape(target_fn):
    def make(d: Path, base: dict) -> None:
        copy(base, d, "shards")
        outside = target_fn(d)
        shutil.copy2(base["shards"] / "train-000000.tar", d / "outside.tar")
        edit_json(d / "shards" / "_info.json",
                  lambda i: i["splits"]["train"].update(filenames=[outside] + i["splits"]["train"]["filenames"][1:]))
    return make


def _run_yaml(d: Path, base: dict) -> None:
    copy(base, d, "run")
    cfg = yaml.safe_load((d / "run" / "config.yaml").read_text())
    cfg["data"] = pipe_address(d / "CANARY")
    (d / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))


def _cv_yaml(d: Path, base: dict) -> None:
    copy(base, d, "cv")
    for k in (0, 1):
        cfg = yaml.safe_load((d / "cv" / f"fold-{k}" / "config.yaml").read_text())
        cfg.update(data=pipe_address(d / "CANARY"), fold=str(k))
        (d / "cv" / f"fold-{k}" / "config.yaml").write_text(yaml.safe_dump(cfg))


def _oof_data(d: Path, base: dict) -> None:
    copy(base, d, "cv")
    path = d / "cv" / "oof.probs.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["data"] = np.array(pipe_address(d / "CANARY"))
    np.savez(path, **arrays)


def _best(name: str, data_fn):
    def make(d: Path, base: dict) -> None:
        copy(base, d, "run")
        p = d / "run" / "best" / name
        p.write_bytes(data_fn(p))
    return make


def _progress(fn):
    def make(d: Path, base: dict) -> None:
        copy(base, d, "run")
        edit_json(d / "run" / CKPT / "progress.json", fn)
    return make


class Canary:
    """A pickle that, when loaded, creates the canary file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _ema_pickle(d: Path, base: dict) -> None:
    import hashlib

    copy(base, d, "run")
    ck = d / "run" / CKPT
    for pkl in ck.glob("custom_checkpoint_*.pkl"):
        pkl.write_bytes(pickle.dumps(Canary(d / "CANARY")))
    edit_json(ck / "progress.json", lambda p: p["files"].update(
        {n: {**p["files"][n], "size": (ck / n).stat().st_size, "sha256": hashlib.sha256((ck / n).read_bytes()).hexdigest()}
         for n in p["files"] if n.startswith("custom_checkpoint_")}))


def _foreign_out(d: Path, base: dict) -> None:
    (d / "shards").mkdir()
    (d / "shards" / "backup-000001.tar").write_bytes(b"someone's backup")


def _npz(**changes):
    """The base probability file with some arrays replaced."""
    def make(d: Path, base: dict) -> None:
        with np.load(base["probs"]) as z:
            arrays = {k: z[k] for k in z.files}
        np.savez(d / "x.probs.npz", **{**arrays, **changes})
    return make


def _bytes(name: str, data: bytes):
    def make(d: Path, base: dict) -> None:
        (d / name).write_bytes(data)
    return make


def _src_symlink_out(d: Path, base: dict) -> None:
    shutil.copytree(base["src"], d / "src")
    (d / "elsewhere").mkdir()
    shutil.copy2(next((d / "src" / "class0").iterdir()), d / "elsewhere" / "x.jpg")
    (d / "src" / "stolen").symlink_to(d / "elsewhere")
    (d / "src" / "class1" / "loop").symlink_to(d / "src")


FILES, MEDIA, WRITER, CONFIG, LOAD = ("trust.files (h20a)", "trust.media (h20b)", "trust.media writer (h20b)",
                                      "trust.files pipe: provenance (h20a)", "trust.files safetensors/json (h20a)")
CASES = [
    Case("info_nested_2000", "inspect", _info_text(nested_json(2000)), needs=FILES),
    Case("info_infinity", "inspect", _info(lambda i: i["splits"]["train"].update(num_samples=float("inf"))),
         needs=FILES, extra={"must_fail": True}),
    Case("info_no_classes", "train", _info(lambda i: i.pop("classes")), needs=FILES, extra={"must_fail": True}),
    Case("info_classes_string", "inspect", _info(lambda i: i.update(classes="catdog")), needs=FILES,
         extra={"must_fail": True}),
    Case("info_classes_string_train", "train", _info(lambda i: i.update(classes="catdog")), needs=FILES,
         extra={"must_fail": True}),
    Case("info_counts_lie", "inspect", _info(lambda i: i["splits"]["train"].update(num_samples=10**12)), needs=FILES,
         extra={"must_fail": True}),
    Case("info_shard_missing", "inspect", lambda d, b: (copy(b, d, "shards"), (d / "shards" / "train-000001.tar").unlink()),
         needs=FILES, extra={"must_fail": True}),
    Case("info_not_a_tar", "inspect", _tar("train-000001.tar", lambda p: b"not a tar" * 100), needs=MEDIA,
         extra={"must_fail": True}),
    Case("info_no_checksums", "inspect", _info(lambda i: i.pop("sha256")), needs=FILES,
         extra={"not_in_out": "checksums ok"}),
    Case("info_path_escape", "inspect", _escape(lambda d: "../outside.tar"), needs=FILES, extra={"must_fail": True}),
    Case("info_path_absolute", "inspect", _escape(lambda d: str(d / "outside.tar")), needs=FILES,
         extra={"must_fail": True}),
    Case("tar_gzip", "inspect", _tar("train-000000.tar", lambda p: gzipped(p.read_bytes())), needs=MEDIA,
         extra={"must_fail": True}),
    Case("tar_gzip_predict", "predict", _tar("train-000000.tar", lambda p: gzipped(p.read_bytes())), needs=MEDIA,
         extra={"must_fail": True}),
    Case("tar_symlink_member", "predict", _tar("train-000000.tar", lambda p: tar_with_link("a.jpg", "/etc/passwd")),
         needs=MEDIA),
    Case("tar_hardlink_member", "predict",
         _tar("train-000000.tar", lambda p: tar_with_link("a.jpg", "../../etc/passwd", symlink=False)), needs=MEDIA),
    Case("tar_absolute_member", "predict", _tar("train-000000.tar", lambda p: tar_bytes([("/tmp/a.jpg", b"x"),
                                                                                            ("/tmp/a.cls", b"0")])),
         needs=MEDIA),
    Case("yaml_pipe_export", "export", _run_yaml, needs=CONFIG),
    Case("cv_yaml_pipe_oof", "oof", _cv_yaml, needs=CONFIG),
    Case("oof_npz_pipe_suspects", "suspects", _oof_data, needs=CONFIG),
    Case("safetensors_truncated", "predict", _best("model.safetensors", lambda p: p.read_bytes()[: p.stat().st_size // 2]),
         needs=LOAD),
    Case("safetensors_header_2e40", "predict", _best("model.safetensors", lambda p: safetensors_with_header(b"{}", 2**40)),
         needs=LOAD),
    Case("safetensors_offsets_past_end", "evaluate", _best("model.safetensors", lambda p: safetensors_with_header(
        {"fc.weight": {"dtype": "F32", "shape": [3, 96], "data_offsets": [0, 10**9]}})), needs=LOAD),
    Case("config_json_model_args", "predict", _best("config.json", lambda p: json.dumps(
        {**json.loads(p.read_text()), "model_args": {"no_such_arg": 1}}).encode()), needs=LOAD),
    Case("config_json_list", "export", _best("config.json", lambda p: b"[]"), needs=LOAD),
    Case("metrics_json_nested", "predict", _best("metrics.json", lambda p: nested_json(5000).encode()), needs=LOAD),
    Case("progress_plan_x_verify", "verify", _progress(lambda p: p.update(plan="x")), needs=FILES,
         extra={"must_fail": True}),
    Case("progress_plan_x_resume", "resume", _progress(lambda p: p.update(plan="x")), needs=FILES),
    Case("progress_step_negative", "resume", _progress(lambda p: p.update(step=-5, epoch=10**9)), needs=FILES),
    Case("checkpoint_pickle_ema", "resume", _ema_pickle, needs="train.integrity (weights-only unpickler), already there"),
    Case("shard_out_foreign_file", "shard", _foreign_out, needs=WRITER),
    Case("shard_src_symlinks_out", "shard", _src_symlink_out, needs=MEDIA),
    Case("npz_object_array", "ensemble", _npz(ids=np.array([{"a": 1}] * 3, dtype=object)), needs=FILES),
    Case("npz_not_a_zip", "calibrate", _bytes("x.probs.npz", b"PK\x03\x04 not really"), needs=FILES),
    Case("npz_prob_nan", "calibrate", _npz(prob=np.full((3, 3), np.nan, np.float32)), needs=FILES),
    Case("npz_prob_shape", "ensemble", _npz(prob=np.ones((2, 7), np.float32)), needs=FILES),
    Case("npz_label_out_of_range", "calibrate", _npz(label=np.array([0, 1, 99])), needs=FILES),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_crafted_file(case: Case, base, tmp_path):
    case.make(tmp_path, base)
    check_case(case.command, tmp_path, base, must_fail=case.extra.get("must_fail", False),
               not_in_out=case.extra.get("not_in_out"))
    if case.name == "shard_out_foreign_file":
        assert (tmp_path / "shards" / "backup-000001.tar").read_bytes() == b"someone's backup"
    if case.name == "shard_src_symlinks_out" and (tmp_path / "shards" / "_info.json").exists():
        info = json.loads((tmp_path / "shards" / "_info.json").read_text())
        assert "stolen" not in info.get("classes", []), "a symlink out of --src was packed as a class"
        assert sum(s["num_samples"] for s in info["splits"].values()) == 18, "a file was packed twice (symlink loop)"


# ----------------------------------------------------------------------------- bombs, memory-bounded
BOMBS = {
    "npz_declares_2GB_ensemble": ("ensemble", lambda d, b: npz_bomb(d / "x.probs.npz", 30_000_000, 18, 64 << 20)),
    "npz_declares_2GB_calibrate": ("calibrate", lambda d, b: npz_bomb(d / "x.probs.npz", 30_000_000, 18, 64 << 20)),
    "jpeg_30000px_train": ("train", _tar("train-000000.tar", lambda p: tar_bytes(
        [("big.jpg", jpeg_declaring(30000, 30000)), ("big.cls", b"0")]))),
    "jpeg_65000px_predict": ("predict", _tar("train-000000.tar", lambda p: tar_bytes(
        [("big.jpg", jpeg_declaring(65000, 65000)), ("big.cls", b"0")]))),
    "tar_member_declares_3GiB_inspect": ("inspect", _tar("train-000001.tar",
                                                         lambda p: tar_member_declaring("x.jpg", 3 << 30))),
    "tar_member_declares_3GiB_predict": ("predict", _tar("train-000001.tar",
                                                         lambda p: tar_member_declaring("x.jpg", 3 << 30))),
    "info_num_samples_1e12_predict": ("predict", _info(lambda i: i["splits"]["train"].update(
        num_samples=10**12, shard_lengths=[10**12 // 4] * 4))),
    "control_valid_predict": ("predict", lambda d, b: copy(b, d, "shards")),  # the limit leaves room for real work
}
BOMB_SCRIPT = """
import json, os, resource, sys
sys.path[:0] = [{root!r}, {tests!r}]
import test_fuzz
from fuzz_corpus import tree, contract
root, base = {cases!r}, {{k: __import__("pathlib").Path(v) for k, v in {base!r}.items()}}
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {headroom}, vm + {headroom}))
for name, cmd in {todo!r}:
    d = __import__("pathlib").Path(root) / name
    before = tree(d, base["shards"].parent)
    o, outputs = test_fuzz.command(cmd, d, base)
    problems = contract(o, before, tree(d, base["shards"].parent), outputs, canary=d / "CANARY")
    text = o.out + o.err + (o.crash or "")
    hit = [m for m in ("MemoryError", "Unable to allocate", "can't allocate memory", "out of memory") if m in text]
    if hit:
        problems.append(f"an allocation hit the memory limit ({{hit[0]}}): the input was not bounded before")
    print(json.dumps({{"name": name, "code": o.code, "problems": problems, "tail": text[-1500:]}}), flush=True)
"""


@pytest.fixture(scope="module")
def bomb_results(base, tmp_path_factory) -> dict[str, dict]:
    """Every bomb case run in one subprocess whose address space is limited to what it holds after
    its imports plus 1.5 GiB (a result line per case, so a hang loses only the cases after it)."""
    root = tmp_path_factory.mktemp("bombs")
    for name, (_, make) in BOMBS.items():
        (root / name).mkdir()
        make(root / name, base)
    script = BOMB_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), cases=str(root),
                                base={k: str(v) for k, v in base.items()}, headroom=3 << 29,
                                todo=[(n, c) for n, (c, _) in BOMBS.items()])
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
        out, err = p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out, err = (e.stdout or b"").decode(), (e.stderr or b"").decode() + "\n(timed out)"
    results = {}
    for line in out.splitlines():
        if line.startswith('{"name"'):
            r = json.loads(line)
            results[r["name"]] = r
    results["_stderr"] = err[-3000:]
    return results


@pytest.mark.parametrize("name", list(BOMBS))
def test_bomb_is_bounded(name, bomb_results):
    r = bomb_results.get(name)
    assert r is not None, f"{name}: no result (the process died or hung first):\n{bomb_results['_stderr']}"
    assert not r["problems"], f"{name}: " + "\n".join(r["problems"]) + "\n" + r["tail"]
    if name.startswith("control"):
        assert r["code"] == 0


# ----------------------------------------------------------------------------- property-based mutation
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


def mutate_json_file(path: Path, data) -> None:
    """`mutate` one JSON file in place."""
    path.write_text(dump(mutate(json.loads(path.read_text()), data)))


def mutate(doc, data) -> object:
    """One random change somewhere in a JSON-like document: a value replaced, a key removed or
    added, a container emptied, or the whole document replaced."""
    if not isinstance(doc, (dict, list)) or not doc or data.draw(st.integers(0, 9)) == 0:
        return data.draw(JSON_VALUES)
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = data.draw(st.sampled_from(keys))
    action = data.draw(st.sampled_from(["descend", "descend", "replace", "delete", "add"]))
    doc = dict(doc) if isinstance(doc, dict) else list(doc)
    if action == "descend":
        doc[key] = mutate(doc[key], data)
    elif action == "replace":
        doc[key] = data.draw(JSON_VALUES)
    elif action == "delete":
        del doc[key]
    elif isinstance(doc, dict):
        doc[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    else:
        doc.append(data.draw(JSON_VALUES))
    return doc


class Scratch:
    """A fresh case folder per example (hypothesis runs many in one test)."""

    def __init__(self, root: Path) -> None:
        self.d = Path(tempfile.mkdtemp(dir=root))

    def __enter__(self) -> Path:
        return self.d

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.d, ignore_errors=True)


def dump(doc) -> str:
    return json.dumps(doc, allow_nan=True)


@FUZZ
@given(data=st.data())
def test_mutated_info_json(data, base, tmp_path):
    with Scratch(tmp_path) as d:
        copy(base, d, "shards")
        mutate_json_file(d / "shards" / "_info.json", data)
        check_case("inspect", d, base)


@FUZZ
@given(data=st.data())
def test_mutated_tar_bytes(data, base, tmp_path):
    """Bytes of a shard overwritten or the shard cut short, its checksum resealed."""
    with Scratch(tmp_path) as d:
        copy(base, d, "shards")
        p = d / "shards" / "train-000000.tar"
        raw = bytearray(p.read_bytes())
        if data.draw(st.booleans()):
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        for _ in range(data.draw(st.integers(1, 8))):
            if raw:
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        p.write_bytes(bytes(raw))
        reseal(d / "shards")
        check_case("inspect", d, base)


@FUZZ
@given(data=st.data())
def test_mutated_progress_json(data, base, tmp_path):
    with Scratch(tmp_path) as d:
        copy(base, d, "run")
        mutate_json_file(d / "run" / CKPT / "progress.json", data)
        check_case("verify", d, base)


def load_outcome(d: Path) -> Outcome:
    from dist_train.infer.load import load_model

    return call_reader(load_model, d / "run", None)


def check_reader(d: Path, base: dict, fn) -> None:
    before = tree(d, base["shards"].parent)
    o = fn()
    problems = contract(o, before, tree(d, base["shards"].parent), (), canary=d / "CANARY")
    assert not problems, "\n".join(problems)


@FUZZ
@given(data=st.data())
def test_mutated_config_yaml(data, base, tmp_path):
    """RUN/config.yaml as the model loader (predict, evaluate, export) and run.py --config read it."""
    from dist_train.config import parse_config

    with Scratch(tmp_path) as d:
        copy(base, d, "run")
        p = d / "run" / "config.yaml"
        p.write_text(yaml.safe_dump(mutate(yaml.safe_load(p.read_text()), data)))
        check_reader(d, base, lambda: load_outcome(d))
        check_reader(d, base, lambda: call_reader(parse_config, ["--config", str(p), "--data", str(base["shards"])]))


@FUZZ
@given(data=st.data(), name=st.sampled_from(["config.json", "metrics.json", "run.json"]))
def test_mutated_best_json(data, name, base, tmp_path):
    with Scratch(tmp_path) as d:
        copy(base, d, "run")
        mutate_json_file(d / "run" / ("run.json" if name == "run.json" else f"best/{name}"), data)
        check_reader(d, base, lambda: load_outcome(d))


@FUZZ
@given(data=st.data())
def test_mutated_safetensors(data, base, tmp_path):
    """The 8-byte header length, the JSON header or the tensor bytes changed, or the file cut."""
    with Scratch(tmp_path) as d:
        copy(base, d, "run")
        p = d / "run" / "best" / "model.safetensors"
        raw = bytearray(p.read_bytes())
        head = int.from_bytes(raw[:8], "little")
        where = data.draw(st.sampled_from(["length", "header", "body", "cut"]))
        if where == "length":
            raw[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
        elif where == "header":
            doc = mutate(json.loads(raw[8:8 + head]), data)
            raw = bytearray(safetensors_with_header(dump(doc).encode(), body=bytes(raw[8 + head:])))
        elif where == "body":
            raw[data.draw(st.integers(8 + head, len(raw) - 1))] ^= 0xFF
        else:
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        p.write_bytes(bytes(raw))
        check_reader(d, base, lambda: load_outcome(d))


ARRAYS = st.one_of(
    st.builds(lambda s, v: np.full(s, v), st.lists(st.integers(0, 3), max_size=3).map(tuple),
              st.floats() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=4) | st.booleans()),
    st.builds(lambda v: np.array(v), st.text(max_size=6)))


def mutate_npz(path: Path, data) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(arrays)))
        if data.draw(st.booleans()) and len(arrays) > 1:
            del arrays[key]
        else:
            arrays[key] = data.draw(ARRAYS)
    np.savez(path, **arrays)


@FUZZ
@given(data=st.data(), cmd=st.sampled_from(["ensemble", "calibrate"]))
def test_mutated_probs_npz(data, cmd, base, tmp_path):
    with Scratch(tmp_path) as d:
        copy(base, d, "probs")
        mutate_npz(d / "x.probs.npz", data)
        check_case(cmd, d, base)


@FUZZ
@given(data=st.data())
def test_mutated_oof_npz(data, base, tmp_path):
    with Scratch(tmp_path) as d:
        copy(base, d, "cv")
        mutate_npz(d / "cv" / "oof.probs.npz", data)
        check_case("suspects", d, base)
