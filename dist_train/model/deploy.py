"""A model as one deployable file: ONNX or TorchScript, with its metadata, and running it back.

Both formats are built in memory, so nothing is written before the parity check has passed
(the caller writes the bytes atomically). ONNX goes through torch's current exporter
(`torch.onnx.export(dynamo=True)`, the default since torch 2.9, which needs onnxscript); the
TorchScript-based ONNX exporter it replaced warns that it will be removed. TorchScript is a
`torch.jit.trace`, which torch 2.14 also marks deprecated: ONNX is the format to prefer.

Metadata: ONNX `metadata_props` (one entry per key, each value JSON text) and TorchScript's
extra file `metadata.json` (the same keys in one JSON object); `read_metadata` reads either.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from timm.layers import set_layer_config

from dist_train.errors import UserError

FORMATS = ("onnx", "torchscript")
EXTRA = "export"  # pyproject.toml's optional extra with the ONNX packages
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT, OUTPUT = "input", "logits"
TS_METADATA = "metadata.json"
ONNX_LIMIT = 2**31  # protobuf's 2 GiB message limit: one ONNX file holds no more


def require_onnx() -> None:
    """The ONNX packages, or one line naming the extra that brings them."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)} (not installed): "
                        f"pip install 'dist_train[{EXTRA}]' (or pip install {' '.join(missing)})")


@contextlib.contextmanager
def exportable() -> Iterator[None]:
    """Build models with timm's export-friendly layers (timm's onnx_export does the same)."""
    with set_layer_config(exportable=True):
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.jit's deprecation notices and the tracer's "treated as a constant" warnings: the
    parity check on real images (and on two batch sizes with a dynamic batch) is the real test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _check_size(model: torch.nn.Module) -> None:
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if size >= ONNX_LIMIT:
        raise UserError(f"the model's weights take {size / 2**30:.1f} GiB; one ONNX file holds under 2 GiB: "
                        "add --half or use --format torchscript")


@torch.no_grad()
def to_onnx(model: torch.nn.Module, example: torch.Tensor, metadata: dict[str, Any], *, dynamic_batch: bool,
            doc: str) -> bytes:
    """The serialized ONNX model (input `input`, output `logits`), metadata included."""
    _check_size(model)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=shapes, verbose=False, optimize=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise UserError(f"torch.onnx.export could not export {type(model).__name__}: {type(e).__name__}: {first} "
                        "(try --format torchscript)") from None
    proto = program.model_proto
    proto.doc_string = doc
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    return proto.SerializeToString()


@torch.no_grad()
def to_torchscript(model: torch.nn.Module, example: torch.Tensor, metadata: dict[str, Any]) -> bytes:
    """The traced model, saved with `metadata.json` as an extra file."""
    with _quiet():
        traced = torch.jit.trace(model, example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={TS_METADATA: json.dumps(metadata, indent=1)})
    return buf.getvalue()


class Exported:
    """An exported model, loaded back (from its bytes or a file) to run on the CPU."""

    def __init__(self, fmt: str, data: bytes | str | Path) -> None:
        self.fmt = fmt
        if fmt == "onnx":
            import onnxruntime as ort

            src = data if isinstance(data, bytes) else str(data)
            self.session = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
        else:
            with _quiet():
                self.module = torch.jit.load(io.BytesIO(data) if isinstance(data, bytes) else str(data),
                                             map_location="cpu")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "onnx":
            return torch.from_numpy(self.session.run([OUTPUT], {INPUT: x.numpy()})[0])
        with torch.no_grad(), _quiet():
            return self.module(x)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file, ONNX or TorchScript, read without loading the model.

    A TorchScript file is a zip archive that keeps extra files as `<name>/extra/<file>`."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            member = next((n for n in z.namelist() if n.endswith(f"/extra/{TS_METADATA}")), None)
            if member is None:
                raise UserError(f"{path}: a TorchScript file without {TS_METADATA} (not written by dist_train.export)")
            return json.loads(z.read(member))
    import onnx

    return {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}
