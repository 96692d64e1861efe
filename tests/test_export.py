"""python -m dist_train.export: ONNX (onnxruntime on the CPU) and TorchScript (torch.jit.load)
match PyTorch on real shard images, the multi-head model leaves as its single classifier, the
preprocessing is in the metadata, a dynamic batch takes two sizes, and bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from conftest import run_main
from dist_train import export
from dist_train.data.device import BatchPrep
from dist_train.data.loaders import build_eval_loader
from dist_train.infer.load import load_model
from dist_train.infer.run import eval_augment
from dist_train.model.deploy import read_metadata
from dist_train.shardset.format import load_info

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # torch 2.14
TRAIN = ["--model", "test_resnet", "--img-size", "32", "--batch-size", "8", "--seed", "0", "--warmup-epochs", "0",
         "--epochs", "1", "--workers", "0", "--mixed-precision", "no"]


@pytest.fixture(scope="module")
def runs(mask_shards, folder_shards, tmp_path_factory) -> dict[str, Path]:
    """Trained runs: `multi` (--head multi on mask data), `single` (plain classification, 3 classes)."""
    base = tmp_path_factory.mktemp("export")
    out = {}
    for name, data, extra in (("multi", mask_shards, ["--head", "multi"]), ("single", folder_shards, [])):
        out[name] = base / name
        proc = run_main(["--data", str(data), "--output", str(out[name]), *TRAIN, *extra])
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return out


def real_images(data: Path, loaded, n: int = 8) -> torch.Tensor:
    """n validation images through the project's eval loader and normalization."""
    info = load_info(str(data))
    loader = build_eval_loader(str(data), info, "validation", aug=eval_augment(loaded.info), batch_size=n,
                               workers=0, world_size=1, rank=0)
    return BatchPrep(torch.device("cpu"), loaded.info["mean"], loaded.info["std"]).images(next(iter(loader))["image"])


def run_file(path: Path, fmt: str, x: torch.Tensor) -> torch.Tensor:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path))(x)


def do_export(capsys, argv: list[str]) -> str:
    export.main([str(a) for a in argv])
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote ") and "\n" not in line
    return line


def exit_line(capsys, argv: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as e:
        export.main([str(a) for a in argv])
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("name", ["single", "multi"])
def test_dynamic_batch_matches_pytorch_on_real_images(capsys, runs, mask_shards, folder_shards, tmp_path, fmt, name):
    data = {"multi": mask_shards, "single": folder_shards}[name]
    out = tmp_path / f"model.{fmt}"
    line = do_export(capsys, ["--run", runs[name], "--format", fmt, "--out", out, "--dynamic-batch"])
    assert "batch dynamic" in line and "split 'validation'" in line and "batch sizes [4, 8]" in line
    loaded = load_model(runs[name])  # best/: the multi-head model already as its single classifier
    x = real_images(data, loaded)
    with torch.no_grad():
        ref = loaded.model(x)
    for batch in (x, x[:3]):  # two batch sizes through one file
        got = run_file(out, fmt, batch)
        assert got.shape == ref[: len(batch)].shape
        assert float((got - ref[: len(batch)]).abs().max()) <= 1e-4


def test_multi_head_checkpoint_exports_the_same_softmax(capsys, runs, mask_shards, tmp_path):
    """From a training checkpoint (the three-head model itself): the exported single classifier's
    softmax equals the product of the three heads' softmaxes."""
    ckpt = sorted((runs["multi"] / "checkpoints").glob("step-*"))[-1]
    out = tmp_path / "ckpt.onnx"
    do_export(capsys, ["--checkpoint", ckpt, "--format", "onnx", "--out", out, "--batch-size", "4"])
    loaded = load_model(None, ckpt)
    assert type(loaded.model).__name__ == "MultiHeadModel"
    x = real_images(mask_shards, loaded)
    with torch.no_grad():
        ref = loaded.model(x).exp()  # the 18-class output is log-probabilities
    got = torch.cat([run_file(out, "onnx", x[i:i + 4]) for i in (0, 4)]).softmax(dim=1)
    assert float((got - ref).abs().max()) <= 1e-5
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_metadata_holds_the_preprocessing(capsys, runs, tmp_path, fmt):
    out = tmp_path / f"m.{fmt}"
    do_export(capsys, ["--run", runs["multi"], "--format", fmt, "--out", out])
    meta = read_metadata(out)
    cfg = json.loads((runs["multi"] / "best" / "config.json").read_text())
    pcfg = cfg["pretrained_cfg"]
    assert meta["input_size"] == pcfg["input_size"] == [3, 32, 32]
    assert meta["mean"] == pcfg["mean"] and meta["std"] == pcfg["std"] and meta["crop_pct"] == pcfg["crop_pct"]
    assert meta["class_names"] == cfg["label_names"] and meta["num_classes"] == 18 and meta["head"] == "multi"
    assert meta["interpolation"] == "bilinear"  # what the eval loader resizes with
    assert meta["resize_shorter_side"] == int(32 / pcfg["crop_pct"])
    assert meta["input_shape"] == [1, 3, 32, 32] and meta["input_dtype"] == "float32"
    assert meta["input_normalized"] is True and meta["output_name"] == "logits"
    if fmt == "onnx":
        model = onnx.load(str(out))
        onnx.checker.check_model(model)
        assert "NCHW" in model.doc_string
        assert {p.key for p in model.metadata_props} >= {"mean", "std", "interpolation", "class_names"}
    else:
        extra = {"metadata.json": ""}
        torch.jit.load(str(out), _extra_files=extra)
        assert json.loads(extra["metadata.json"]) == meta


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_half_is_float16_and_close(capsys, runs, folder_shards, tmp_path, fmt):
    out = tmp_path / f"h.{fmt}"
    line = do_export(capsys, ["--run", runs["single"], "--format", fmt, "--out", out, "--half"])
    assert ", float16," in line and read_metadata(out)["input_dtype"] == "float16"
    loaded = load_model(runs["single"])
    x = real_images(folder_shards, loaded, n=1)
    with torch.no_grad():
        ref = loaded.model(x)
    got = run_file(out, fmt, x.half())
    assert got.dtype == torch.float16
    assert float((got.float() - ref).abs().max()) <= 1e-2 * max(1.0, float(ref.abs().max()))


def test_failed_parity_writes_nothing(capsys, runs, tmp_path, monkeypatch):
    """An exported file whose outputs are off is refused with one line (exit 1); what --out held stays."""
    from dist_train.infer import deploy
    from dist_train.model.deploy import Exported

    class Off(Exported):
        def __call__(self, x):
            return super().__call__(x) + 1e-3

    monkeypatch.setattr(deploy, "Exported", Off)
    out = tmp_path / "keep.pt"
    out.write_bytes(b"old")
    line = exit_line(capsys, ["--run", runs["single"], "--format", "torchscript", "--out", out], code=1)
    assert "export check failed: torchscript output differs from PyTorch by 0.001" in line and "not written" in line
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["keep.pt"]


def test_without_a_shard_set_it_checks_on_random_inputs(capsys, runs, tmp_path):
    """The run's shard set has moved away: the check still runs, on random inputs, and says so."""
    cfg = runs["single"] / "config.yaml"
    text = cfg.read_text()
    try:
        cfg.write_text(yaml.safe_dump({**yaml.safe_load(text), "data": str(tmp_path / "moved")}))
        line = do_export(capsys, ["--run", runs["single"], "--format", "torchscript", "--out", tmp_path / "r.pt"])
    finally:
        cfg.write_text(text)
    assert "8 random inputs (no --data)" in line


def test_bad_input_is_one_line(capsys, runs, tmp_path, monkeypatch):
    run = runs["single"]
    (tmp_path / "file").write_text("x")
    assert "is a folder" in exit_line(capsys, ["--run", run, "--format", "onnx", "--out", tmp_path])
    assert "is a file, not a folder" in exit_line(capsys, ["--run", run, "--format", "onnx",
                                                           "--out", tmp_path / "file" / "m.onnx"])
    assert "no such folder" in exit_line(capsys, ["--run", tmp_path / "nope", "--format", "onnx",
                                                  "--out", tmp_path / "m.onnx"])
    assert "--batch-size 0" in exit_line(capsys, ["--run", run, "--format", "onnx", "--out", tmp_path / "m.onnx",
                                                  "--batch-size", "0"])
    assert "invalid choice" in exit_line(capsys, ["--run", run, "--format", "tflite", "--out", tmp_path / "m"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    line = exit_line(capsys, ["--run", run, "--format", "onnx", "--out", tmp_path / "m.onnx"])
    assert line == ("error: --format onnx needs onnxruntime (not installed): pip install 'dist_train[export]' "
                    "(or pip install onnxruntime)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
