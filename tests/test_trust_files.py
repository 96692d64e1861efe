"""The file-format half of the trust boundary (issue 20): run folders, CV folders, `_info.json`,
safetensors and npz files made by someone else are one `error:` line, never a command run, a
traceback or a huge allocation. Every file here is crafted by the test; nothing trains."""

from __future__ import annotations

import io
import json
import resource
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import timm
import yaml

from dist_train import checkpoint as checkpoint_cli
from dist_train import export, oof, suspects
from dist_train.errors import UserError
from dist_train.infer.files import Predictions, load_probs, save_oof, save_probs
from dist_train.infer.load import load_model
from dist_train.model.export import save_for_timm
from dist_train.shardset.format import load_info
from dist_train.trust.arrays import MAX_NPZ_BYTES
from dist_train.trust.files import parse_json, read_yaml, stored_address
from dist_train.trust.shardinfo import MAX_CLASSES, MAX_SAMPLES

CLASSES = ["class0", "class1", "class2"]


def one_line(main, argv, capsys, code: int = 2) -> str:
    """`main(argv)` exits `code` with exactly one `error: ` line on stderr and no traceback."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == code, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def pipe_that_marks(marker: Path) -> str:
    """A data address that, if anything ran it, would create `marker` (the `://` makes it look remote)."""
    return f"pipe:touch {marker} # http://example.com/{{}}"


# ----------------------------------------------------------------------------- a run folder, untrained
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder as dist_train/run.py leaves it: config.yaml, run.json, best/ (random weights)."""
    run = tmp_path_factory.mktemp("trust") / "run"
    model = timm.create_model("test_resnet", num_classes=3)
    save_for_timm(model, run / "best", model_name="test_resnet", num_classes=3, label_names=CLASSES, img_size=32,
                  crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": "/nonexistent", "model": "test_resnet", "img_size": 32}))
    (run / "run.json").write_text(json.dumps({"model": "test_resnet", "num_classes": 3, "head": "single",
                                              "classes": CLASSES}))
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def test_the_untouched_run_folder_loads(run):
    loaded = load_model(run)
    assert loaded.info["num_classes"] == 3 and loaded.info["label_names"] == CLASSES


# ----------------------------------------------------------------------------- commands only from the command line
def test_a_pipe_address_in_config_yaml_never_runs_in_export(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    address = pipe_that_marks(marker)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": address, "model": "test_resnet"}))
    line = one_line(export.main, ["--run", run, "--format", "torchscript", "--out", tmp_path / "m.pt"], capsys)
    assert not marker.exists() and not (tmp_path / "m.pt").exists()
    assert f"{run / 'config.yaml'}: data address {address!r} is not a local path or an http(s)/s3/gs URL" in line
    assert "pass it explicitly with --data" in line


def test_a_pipe_address_in_a_cv_fold_config_never_runs_in_oof(tmp_path, capsys):
    marker, cv = tmp_path / "pwned", tmp_path / "cv"
    (cv / "fold-0").mkdir(parents=True)
    (cv / "fold-0" / "config.yaml").write_text(yaml.safe_dump({"data": pipe_that_marks(marker), "fold": "0"}))
    line = one_line(oof.main, [cv], capsys)
    assert not marker.exists()
    assert f"{cv / 'fold-0' / 'config.yaml'}: data address" in line and "--data" in line


def test_a_pipe_address_in_a_cv_fold_config_never_runs_in_predict(tmp_path, capsys):
    from dist_train import predict

    marker, cv = tmp_path / "pwned", tmp_path / "cv"
    (cv / "fold-0").mkdir(parents=True)
    (cv / "fold-0" / "config.yaml").write_text(yaml.safe_dump({"data": pipe_that_marks(marker), "fold": "0"}))
    line = one_line(predict.main, ["--run", cv, "--data", tmp_path / "eval", "--out", tmp_path / "p.csv"], capsys)
    assert not marker.exists()
    assert f"{cv / 'fold-0' / 'config.yaml'}: data address" in line and f"predict each fold with --run {cv}/fold-k" in line


def test_a_pipe_address_stored_in_an_oof_file_never_runs_in_suspects(tmp_path, capsys):
    marker, cv = tmp_path / "pwned", tmp_path / "cv"
    cv.mkdir()
    prob = np.full((4, 3), 1 / 3)
    preds = Predictions("key", [f"k{i}" for i in range(4)], prob.argmax(1), CLASSES, np.array([0, 1, 2, 0]), prob)
    save_oof(cv / "oof.probs.npz", preds, [0, 1, 0, 1], [{}] * 4, pipe_that_marks(marker), "train")
    line = one_line(suspects.main, [cv], capsys)
    assert not marker.exists()
    assert f"{cv / 'oof.probs.npz'}: data address" in line and "--data" in line


@pytest.mark.parametrize("address", ["pipe:cat x", "ais://bucket/x", "hf://x", "sftp://h/x", "a\nb", "", "pipe:"])
def test_only_plain_paths_and_web_urls_are_taken_from_files(address):
    with pytest.raises(UserError, match="f.yaml: data address"):
        stored_address(address, "f.yaml")


@pytest.mark.parametrize("address", ["/data/shards", "shards", "C:/data", "https://h/x", "s3://b/x", "gs://b/x"])
def test_plain_addresses_from_files_are_used(address):
    assert stored_address(address, "f.yaml") == address


# ----------------------------------------------------------------------------- _info.json
@pytest.fixture
def shards(folder_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(folder_shards, out)
    return out


def set_info(shards: Path, change) -> Path:
    info = json.loads((shards / "_info.json").read_text())
    text = change(info)
    if isinstance(text, bytes):
        (shards / "_info.json").write_bytes(text)
    else:
        (shards / "_info.json").write_text(text if isinstance(text, str) else json.dumps(info))
    return shards


def one_split(info: dict) -> dict:
    return info["splits"]["train"]


def more_in_first_shard(info: dict, n: int) -> None:
    """Train's first shard counted as holding n samples, every other count consistent with it."""
    s = one_split(info)
    extra = n - s["shard_lengths"][0]
    s["shard_lengths"][0] = n
    s["num_samples"] += extra
    info["label_counts"]["train"]["0"] += extra


BAD_INFO = {
    "nested 2000 deep": (lambda i: json.dumps({**i, "params": "X"}).replace('"X"', "[" * 2000 + "]" * 2000),
                         "nested more than 64 levels, expected at most 64"),
    "Infinity": (lambda i: json.dumps(i).replace('"rejected": 0', '"rejected": Infinity'),
                 "not valid JSON (Infinity is not a finite number)"),
    "NaN": (lambda i: json.dumps(i).replace('"rejected": 0', '"rejected": NaN'), "NaN is not a finite number"),
    "without classes": (lambda i: i.pop("classes"), "classes: expected a value (required)"),
    "classes as a string": (lambda i: i.update(classes="catdog"), "classes: expected a list of at most"),
    "a million classes": (lambda i: i.update(classes=[f"c{k}" for k in range(1_000_000)]),
                          f"classes: expected a list of at most {MAX_CLASSES:,} items, got a list of 1000000"),
    "num_samples 1e12": (lambda i: one_split(i).update(num_samples=10**12,
                                                       shard_lengths=[10**12] + one_split(i)["shard_lengths"][1:]),
                         f"splits.train.num_samples: expected an integer 0..{MAX_SAMPLES}"),
    "num_samples as 1e12 float": (lambda i: one_split(i).update(num_samples=1e12), "expected an integer"),
    "negative shard length": (lambda i: one_split(i).update(shard_lengths=[-1] * len(one_split(i)["filenames"])),
                              "splits.train.shard_lengths[0]: expected an integer"),
    "counts that disagree": (lambda i: one_split(i).update(num_samples=one_split(i)["num_samples"] + 1),
                             "splits.train.num_samples: expected the sum of shard_lengths"),
    "label counts of other classes": (lambda i: i["label_counts"]["train"].update({"7": 0}),
                                      "label_counts.train: expected class indices 0..2"),
    "more samples than the tar holds": (lambda i: more_in_first_shard(i, 5000), "too small for the 5,000 samples"),
    "a list": (lambda i: "[]", "_info.json: the document: expected an object, got a list of 0"),
    "not UTF-8": (lambda i: b"\xff\xfe{}", "not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(BAD_INFO))
def test_a_crafted_info_json_is_one_line(shards, case):
    change, words = BAD_INFO[case]
    set_info(shards, change)
    with pytest.raises(UserError) as e:
        load_info(str(shards))
    assert words in str(e.value) and str(e.value).startswith(str(shards / "_info.json"))
    assert "\n" not in str(e.value) and len(str(e.value)) < 600


def test_info_json_checks_leave_the_writers_own_alone(folder_shards, fold_shards):
    for data in (folder_shards, fold_shards):
        assert load_info(str(data))["classes"]


def test_a_shard_set_without_classes_is_refused_by_training(shards, tmp_path):
    from conftest import run_main

    set_info(shards, lambda i: i.pop("classes"))
    p = run_main(["--data", str(shards), "--output", str(tmp_path / "o"), "--model", "test_resnet", "--img-size", "32",
                  "--epochs", "1", "--workers", "0", "--batch-size", "8"])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert [x for x in p.stderr.splitlines() if x.startswith("error: ")] == [
        f"error: {shards / '_info.json'}: classes: expected a value (required), got nothing: expected a shard set "
        "written by python -m dist_train.shard"]
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- best/ and checkpoints
def header_of(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def with_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def first_tensor(header: dict) -> str:
    return next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")


CRAFTED_WEIGHTS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated or padded"),
    "shorter than its header": (lambda p: p.write_bytes(p.read_bytes()[:100]), "beyond the end of a"),
    "header length 2**60": (lambda p: p.write_bytes(struct.pack("<Q", 1 << 60) + p.read_bytes()[8:]),
                            "over the limit"),
    "three bytes": (lambda p: p.write_bytes(b"abc"), "shorter than the 8-byte header length"),
    "offsets past the end": (lambda p: _edit(p, lambda h: h[first_tensor(h)].update(data_offsets=[0, 1 << 40])),
                             "data_offsets 0..1099511627776"),
    "a dtype safetensors lacks": (lambda p: _edit(p, lambda h: h[first_tensor(h)].update(dtype="Q99")),
                                  "dtype: expected one of BOOL"),
    "a shape that does not fit": (lambda p: _edit(p, lambda h: h[first_tensor(h)].update(shape=[1 << 20, 1 << 20])),
                                  "needs 4,398,046,511,104"),
    "a header nested deep": (lambda p: _edit(p, lambda h: h.update(__metadata__=json.loads("[" * 500 + "]" * 500))),
                             "nested more than 64 levels"),
}


def _edit(path: Path, change) -> None:
    _, header, data = header_of(path)
    change(header)
    with_header(path, header, data)


@pytest.mark.parametrize("case", sorted(CRAFTED_WEIGHTS))
def test_a_crafted_model_safetensors_is_one_line(run, tmp_path, capsys, case):
    change, words = CRAFTED_WEIGHTS[case]
    weights = run / "best" / "model.safetensors"
    change(weights)
    with pytest.raises(UserError, match="model.safetensors") as e:
        load_model(run)
    assert words in str(e.value), str(e.value)
    line = one_line(export.main, ["--run", run, "--format", "torchscript", "--out", tmp_path / "m.pt"], capsys)
    assert line == f"error: {e.value}"


@pytest.mark.parametrize("model_args, words", [
    ("x", "model_args: expected an object"),
    ({"img_size": "big"}, "model_args.img_size: expected an integer 1..16384"),
    ({"depth": "x"}, "do not build test_resnet (TypeError"),
    ({"layers": {"a": 1}}, "model_args.layers: expected a number, string"),
])
def test_bad_model_args_in_config_json_are_one_line(run, tmp_path, capsys, model_args, words):
    cfg = json.loads((run / "best" / "config.json").read_text())
    cfg["model_args"] = model_args
    (run / "best" / "config.json").write_text(json.dumps(cfg))
    line = one_line(export.main, ["--run", run, "--format", "torchscript", "--out", tmp_path / "m.pt"], capsys)
    assert line.startswith(f"error: {run / 'best' / 'config.json'}: ") and words in line, line


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(num_classes=10**9), "num_classes: expected an integer 1..100000"),
    (lambda c: c["pretrained_cfg"].update(input_size=[3, 10**6, 10**6]), "input_size[1]: expected an integer"),
    (lambda c: c["pretrained_cfg"].update(std=[0, 1, 1]), "std[0]: expected a finite number > 0"),
    (lambda c: c.update(label_names=["a"]), "label_names: expected as many entries as num_classes says (3)"),
])
def test_a_crafted_config_json_is_one_line(run, change, words):
    cfg = json.loads((run / "best" / "config.json").read_text())
    change(cfg)
    (run / "best" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="config.json") as e:
        load_model(run)
    assert words in str(e.value)


def fake_checkpoint(run: Path, progress: dict) -> Path:
    ckpt = run / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "progress.json").write_text(json.dumps({**progress, "files": {}}))
    return ckpt


@pytest.mark.parametrize("field, value, words", [
    ("plan", "x", "plan: expected an object or null, got 'x'"),
    ("epoch", -1, "epoch: expected an integer 0..1000000000"),
    ("best_f1", 1e308, "best_f1: expected a finite number"),
    ("plan", {"world": 2, "workers": 1, "batch": 8, "done": "$(touch x)"}, "plan.done: expected a string matching"),
    ("__class__", "x", "__class__: expected no such key (unknown)"),
])
def test_a_crafted_progress_json_is_damaged_for_verify(run, capsys, field, value, words):
    fake_checkpoint(run, {"epoch": 0, "step": 1, field: value})
    with pytest.raises(SystemExit) as e:
        checkpoint_cli.main(["--verify", str(run)])
    out = capsys.readouterr().out.splitlines()
    assert e.value.code == 1 and out[0].startswith("step-00000001: damaged: progress.json: ") and words in out[0], out
    assert out[1].startswith("0 of 1 good")


@pytest.fixture(scope="module")
def checkpointed(folder_shards, tmp_path_factory) -> tuple[Path, list[str]]:
    """A real one-step run with its checkpoint, and the flags that made it."""
    from conftest import run_main

    out = tmp_path_factory.mktemp("ckpt") / "run"
    flags = ["--data", str(folder_shards), "--model", "test_resnet", "--img-size", "32", "--workers", "0",
             "--batch-size", "8", "--epochs", "1", "--max-steps", "1", "--checkpoint-every", "1"]
    p = run_main([*flags, "--output", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    return out, flags


def test_a_plan_that_is_not_one_is_refused_by_verify_and_resume(checkpointed, tmp_path, capsys):
    """The issue's case: progress.json edited after the checksums (they cover every other file)."""
    from conftest import run_main

    run, flags = tmp_path / "run", checkpointed[1]
    shutil.copytree(checkpointed[0], run)
    (ckpt,) = (run / "checkpoints").iterdir()
    progress = json.loads((ckpt / "progress.json").read_text())
    (ckpt / "progress.json").write_text(json.dumps({**progress, "plan": "x"}))
    with pytest.raises(SystemExit) as e:
        checkpoint_cli.main(["--verify", str(run)])
    out = capsys.readouterr().out.splitlines()
    assert e.value.code == 1 and out[0] == f"{ckpt.name}: damaged: progress.json: plan: expected an object or null, got 'x'"
    for resume, words in [("auto", f"--resume auto: no good checkpoint in {run / 'checkpoints'} (1 damaged"),
                          (str(ckpt), f"--resume {ckpt}: damaged checkpoint: progress.json: plan: ")]:
        p = run_main([*flags, "--max-steps", "2", "--output", str(run), "--resume", resume])
        errors = [x for x in p.stderr.splitlines() if x.startswith("error: ")]
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(errors) == 1, p.stderr[-2000:]
        assert words in errors[0], errors


# ----------------------------------------------------------------------------- npz
def honest_probs(path: Path, n: int = 4) -> Predictions:
    prob = np.full((n, 3), 1 / 3)
    p = Predictions("key", [f"k{i}" for i in range(n)], prob.argmax(1), CLASSES, np.zeros(n, dtype=np.int64), prob)
    save_probs(path, p)
    return p


def npy_header(shape: tuple, dtype: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def zip_bomb_member(header: bytes, zero_bytes: int, chunk: int = 1 << 20) -> tuple[bytes, int]:
    """(raw deflate stream, its uncompressed size) of `header` then `zero_bytes` zeros, built in
    a moment: after a sync flush, every further chunk of zeros compresses to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.compress(bytes(chunk)) + c.flush(zlib.Z_SYNC_FLUSH)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_SYNC_FLUSH)
    assert c.compress(bytes(chunk)) + c.flush(zlib.Z_SYNC_FLUSH) == block
    count = zero_bytes // chunk
    return head + block * (count - 1) + c.flush(), len(header) + count * chunk


def write_zip(path: Path, members: list[tuple[str, bytes, int, int]]) -> None:
    """A zip of deflated members given as (name, raw deflate stream, crc32, uncompressed size)."""
    out, central = bytearray(), bytearray()
    for name, raw, crc, size in members:
        fields = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x5021, crc, len(raw), size)
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0,
                                                                               len(out)) + name.encode()
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name.encode() + raw
    eocd = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + eocd))


def deflated(name: str, array: np.ndarray) -> tuple[str, bytes, int, int]:
    buf = io.BytesIO()
    np.save(buf, array)
    data = buf.getvalue()
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return name, c.compress(data) + c.flush(), zlib.crc32(data), len(data)


def write_bomb(path: Path, rows: int, classes: int) -> None:
    """A probability file whose `prob` declares rows x classes float32 and inflates to exactly that
    (its crc is left 0: nothing may read that far)."""
    raw, size = zip_bomb_member(npy_header((rows, classes), "<f4"), rows * classes * 4)
    write_zip(path, [deflated("id_column.npy", np.array("key")), deflated("ids.npy", np.array(["k"] * rows)),
                     deflated("classes.npy", np.array([f"c{i}" for i in range(classes)])),
                     ("prob.npy", raw, 0, size)])


def test_a_compressed_npz_bomb_is_refused_before_inflating(tmp_path, capsys):
    from dist_train import ensemble

    bomb = tmp_path / "bomb.probs.npz"
    write_bomb(bomb, 1 << 20, 700)  # 2.9 GB of float32 declared
    assert bomb.stat().st_size < 4 << 20
    with zipfile.ZipFile(bomb) as z:
        assert z.getinfo("prob.npy").file_size > MAX_NPZ_BYTES
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = one_line(ensemble.main, ["--out", tmp_path / "e.csv", bomb, bomb], capsys)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB
    assert f"{bomb}: arrays declaring over {MAX_NPZ_BYTES:,} bytes uncompressed" in line
    assert "refused before inflating" in line and grown < 200 * 1024


@pytest.mark.parametrize("case, words", [
    ("prob rows", "prob is (5, 3), expected (4, 3)"),
    ("object array", "holds Python objects"),
    ("prob as strings", "array 'prob' is <U1"),
    ("declared larger than stored", "(crafted or damaged)"),
    ("not a zip", "not an npz file"),
    ("non-finite prob", "prob holds non-finite values"),
])
def test_a_crafted_probability_file_is_one_line(tmp_path, case, words):
    path = tmp_path / "p.probs.npz"
    honest_probs(path)
    arrays = dict(np.load(path))
    if case == "prob rows":
        arrays["prob"] = np.zeros((5, 3), dtype=np.float32)
    elif case == "object array":
        arrays["label"] = np.array([object()] * 4)
    elif case == "prob as strings":
        arrays["prob"] = np.array([["a"] * 3] * 4)
    elif case == "non-finite prob":
        arrays["prob"] = np.full((4, 3), np.nan, dtype=np.float32)
    if case == "declared larger than stored":  # a (400, 3) header over the (4, 3) array's bytes
        members = [deflated(f"{k}.npy", a) for k, a in arrays.items() if k != "prob"]
        buf = io.BytesIO()
        np.save(buf, arrays["prob"])
        data = npy_header((400, 3), "<f4") + buf.getvalue()[len(npy_header((4, 3), "<f4")):]
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        write_zip(path, [*members, ("prob.npy", c.compress(data) + c.flush(), zlib.crc32(data), len(data))])
    elif case == "not a zip":
        path.write_bytes(b"PK\x03\x04 not really")
    else:
        np.savez(path, **arrays)
    with pytest.raises(UserError) as e:
        load_probs(path)
    assert words in str(e.value) and str(e.value).startswith(str(path)), str(e.value)


# ----------------------------------------------------------------------------- the parsers themselves
def test_json_and_yaml_limits(tmp_path):
    for depth in (65, 500, 100_000):  # under and over the C parser's recursion limit
        with pytest.raises(UserError, match="x.json: nested more than 64 levels, expected at most 64$"):
            parse_json("[" * depth + "]" * depth, "x.json")
    assert parse_json("[" * 64 + "]" * 64, "x") == json.loads("[" * 64 + "]" * 64)
    assert parse_json(json.dumps({"a": "[" * 100}), "x") == {"a": "[" * 100}
    with pytest.raises(UserError, match="x.json: 11 bytes, expected at most 10"):
        parse_json('"abcdefghi"', "x.json", max_bytes=10)
    y = tmp_path / "c.yaml"
    y.write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(UserError, match="c.yaml: aliases"):
        read_yaml(y)
    y.write_text("a: " + "[" * 200 + "]" * 200)
    with pytest.raises(UserError, match="c.yaml: nested more than 64 levels, expected at most 64$"):
        read_yaml(y)
    y.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(UserError, match="c.yaml: not valid YAML"):
        read_yaml(y)
    y.write_bytes(b"a: 1\n" * 300_000)
    with pytest.raises(UserError, match="c.yaml: 1,500,000 bytes, expected at most 1,048,576"):
        read_yaml(y)


def test_a_crafted_pretrained_path_is_one_line(trained, tmp_path):
    from dist_train.model.build import create_model

    weights = tmp_path / "w.safetensors"
    shutil.copy(trained / "best" / "model.safetensors", weights)
    _edit(weights, lambda h: h[first_tensor(h)].update(shape=[1 << 20, 1 << 20]))
    with pytest.raises(UserError, match=f"{weights}: tensor .* needs 4,398,046,511,104"):
        create_model("test_resnet", 3, pretrained_path=str(weights))
