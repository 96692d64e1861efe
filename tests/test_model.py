"""Model building, local weights, timm-format export and the multi-head model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from dist_train.errors import UserError
from dist_train.model.build import data_config
from dist_train.model.export import load_trained, save_for_timm
from dist_train.tasks import build_model as create_model  # timm models, and the heads tasks add
from dist_train.tasks.mask import labels as L
from dist_train.tasks.mask.model import MultiHeadModel, multi_head_loss

NAMES = [f"c{i}" for i in range(18)]


def _same_state(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if not k.startswith(skip)]
    return sorted(keys) == sorted(k for k in sb if not k.startswith(skip)) and all(torch.equal(sa[k], sb[k]) for k in keys)


# ----------------------------------------------------------------------------- create
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"])
def test_create_and_forward_tiny(name: str) -> None:
    model = create_model(name, 7, img_size=32, drop_rate=0.1, drop_path_rate=0.05).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    cfg = data_config(model)
    assert cfg["input_size"] == (3, 32, 32)
    assert {"mean", "std", "crop_pct", "interpolation"} <= set(cfg)


def test_vit_gets_img_size_any_size() -> None:
    model = create_model("vit_tiny_patch16_224", 3, img_size=48).eval()
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    assert model.patch_embed.img_size == (48, 48)


@pytest.mark.parametrize("name,size,head,message", [
    ("test_vit", 40, "single", "--img-size 40: test_vit cuts the image into 16x16 patches and 40 is not a multiple of 16 "
                               "(the last 8 rows and columns would never be seen); pass --img-size 32 or 48"),
    ("test_vit", 8, "multi", "8 is not a multiple of 16 (the last 8 rows and columns would never be seen); pass "
                             "--img-size 16"),
    ("test_convnext", 8, "single", "--img-size 8: test_convnext cannot take 8x8 images (RuntimeError: Calculated "
                                   "padded input size"),
    ("test_convnext", 8, "multi", "; pass --img-size 32"),
    # fixes its input size at build time (sizes are probed on models built again), a distillation head
    ("levit_128s", 40, "single", "levit_128s cannot take 40x40 images (RuntimeError: The size of tensor a (9) must "
                                 "match the size of tensor b (4) at non-singleton dimension 3); pass --img-size 32 or 48"),
])
def test_img_size_the_model_cannot_take_is_one_line_naming_sizes_it_can(name, size, head, message) -> None:
    with pytest.raises(UserError) as e:
        create_model(name, 18 if head == "multi" else 3, head=head, img_size=size)
    assert message in str(e.value) and "\n" not in str(e.value)
    for ok in (32, 48):  # the sizes suggested build and run
        create_model(name, 3, img_size=ok).eval()(torch.randn(1, 3, ok, ok))


def test_img_size_probe_is_shape_only_and_leaves_the_model_as_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs on meta tensors: the model's weights, buffers and training mode are untouched,
    and a model whose layers have no meta kernel is confirmed on a real forward before any refusal."""
    from dist_train.model import sizes

    torch.manual_seed(0)
    model = create_model("test_efficientnet", 3, img_size=32)
    torch.manual_seed(0)
    plain = timm.create_model("test_efficientnet", num_classes=3)
    assert model.training and _same_state(model, plain)
    assert sizes._forward_error(model, 32, meta=True) is None and model.training
    calls = []
    real = sizes._forward_error

    def no_meta(m, size, *, meta):
        calls.append(meta)
        return "NotImplementedError: no meta kernel" if meta else real(m, size, meta=False)

    monkeypatch.setattr(sizes, "_forward_error", no_meta)
    sizes.check_img_size(model, "test_efficientnet", 32, num_classes=3, takes_size=False)  # no refusal
    assert calls == [True, False]


@pytest.mark.parametrize("name", ["resnet_18", "not_a_model", "local-dir:/tmp/x", "resnet18:foo"])
def test_unknown_model_is_user_error(name: str) -> None:
    with pytest.raises(UserError, match="unknown timm model"):
        create_model(name, 3)


def test_bad_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="--head"):
        create_model("resnet18", 3, head="double")
    with pytest.raises(UserError, match="18"):
        create_model("resnet18", 5, head="multi")
    with pytest.raises(UserError, match="drop_path_rate"):
        create_model("vgg11", 3, drop_path_rate=0.1)
    with pytest.raises(UserError, match="either"):
        create_model("resnet18", 3, pretrained=True, pretrained_path="x.pth")


def test_failed_download_suggests_pretrained_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants  # reads its environment at import: patch the values

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, offline
    with pytest.raises(UserError, match="--pretrained-path") as e:
        create_model("resnet18", 3, pretrained=True)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- local weights
@pytest.fixture
def resnet_src() -> torch.nn.Module:
    torch.manual_seed(3)
    return timm.create_model("resnet18", num_classes=10)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "folder", "checkpoint"])
def test_pretrained_path_same_classes_loads_everything(tmp_path: Path, resnet_src, fmt: str) -> None:
    sd = resnet_src.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file(sd, str(path))
    elif fmt == "folder":
        path = tmp_path
        safetensors.torch.save_file(sd, str(tmp_path / "model.safetensors"))
    elif fmt == "checkpoint":  # a training checkpoint: {'state_dict': ...} with DDP's 'module.' prefix
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    else:
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    model = create_model("resnet18", 10, pretrained_path=str(path))
    assert _same_state(model, resnet_src)


def test_pretrained_path_other_classes_reinits_classifier(tmp_path: Path, resnet_src) -> None:
    torch.save(resnet_src.state_dict(), tmp_path / "w.pth")
    model = create_model("resnet18", 4, pretrained_path=str(tmp_path / "w.pth"))
    assert model.fc.weight.shape == (4, 512)
    assert _same_state(model, resnet_src, skip=("fc.",))
    multi = create_model("resnet18", 18, pretrained_path=str(tmp_path / "w.pth"), head="multi")
    assert _same_state(multi.backbone, resnet_src, skip=("fc.",))


def test_pretrained_path_other_classes_keeps_what_reset_classifier_remakes_beside_it(tmp_path: Path) -> None:
    """EfficientViT-MSRA's reset_classifier re-makes its head BatchNorm with the Linear: the file's
    BatchNorm comes back, only get_classifier() is new (as timm's hub weights give it)."""
    src = timm.create_model("efficientvit_m0", num_classes=10)
    with torch.no_grad():
        for t in (src.head.bn.weight, src.head.bn.bias, src.head.bn.running_mean):
            t.uniform_(0.5, 1.5)
    safetensors.torch.save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = create_model("efficientvit_m0", 3, pretrained_path=str(tmp_path / "w.safetensors"))
    assert model.head.linear.weight.shape[0] == 3
    assert _same_state(model, src, skip=("head.linear.",))


def test_pretrained_path_vit_resamples_to_img_size(tmp_path: Path) -> None:
    src = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    model = create_model("vit_tiny_patch16_224", 3, img_size=32, pretrained_path=str(tmp_path / "vit.pth"))
    assert model.pos_embed.shape == (1, 1 + 4, 192)
    assert torch.equal(model.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)


def test_weights_timm_cannot_resize_to_img_size_say_which_size_they_fit(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """LeViT's attention biases are sized for the input, and timm has no filter to resample them:
    the line used to name only shape mismatches (and, from the hub, said to fetch the weights again)."""
    from dist_train.model import build

    safetensors.torch.save_file(timm.create_model("levit_128s").state_dict(), str(tmp_path / "levit.safetensors"))
    with pytest.raises(UserError, match=r"attention_biases \[4, 196\] vs model \[4, 4\].*; they fit levit_128s "
                                        r"built for its own 224 px input: timm cannot resize them to --img-size 32, "
                                        r"pass --img-size 224$"):
        create_model("levit_128s", 3, img_size=32, pretrained_path=str(tmp_path / "levit.safetensors"))

    def hub(name: str, **kw):  # timm's hub loader, as it fails on those shapes
        if "img_size" in kw:
            raise RuntimeError("Error(s) in loading state_dict for Levit:\n\tsize mismatch for x: copying a param "
                               "with shape torch.Size([4, 196]) from checkpoint, the shape in current model is "
                               "torch.Size([4, 4]).")
        return torch.nn.Identity()

    monkeypatch.setattr(build, "_timm", hub)
    with pytest.raises(UserError, match=r"^--pretrained: timm's weights do not fit levit_128s at --img-size 32: shape "
                                        r"mismatch x \[4, 196\] vs model \[4, 4\]; they fit .* pass --img-size 224$"):
        build.create_model("levit_128s", 3, img_size=32, pretrained=True)


@pytest.mark.parametrize("num_classes", [10, 4])
def test_mismatched_weights_are_user_error(tmp_path: Path, resnet_src, num_classes: int) -> None:
    sd = resnet_src.state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(3, 3)
    del sd["layer2.0.bn1.bias"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        create_model("resnet18", num_classes, pretrained_path=str(tmp_path / "bad.pth"))
    msg = str(e.value)
    assert "bad.pth" in msg and "\n" not in msg
    assert "layer2.0.bn1.bias" in msg and "extra.weight" in msg and "layer1.0.conv1.weight" in msg


def test_other_architecture_weights_are_user_error(tmp_path: Path, resnet_src) -> None:
    torch.save(resnet_src.state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="do not fit resnet34"):
        create_model("resnet34", 10, pretrained_path=str(tmp_path / "r18.pth"))


def test_unreadable_or_missing_weights(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        create_model("resnet18", 3, pretrained_path=str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="no such file"):
        create_model("resnet18", 3, pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="folder holds none"):
        create_model("resnet18", 3, pretrained_path=str(tmp_path))


# ----------------------------------------------------------------------------- export
_PLAIN_TIMM = """
import sys, torch, timm
assert not any(m.startswith("dist_train") for m in sys.modules)
m = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(m(x), sys.argv[3])
assert not any(m.startswith("dist_train") for m in sys.modules)
"""


def _timm_subprocess(best: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _PLAIN_TIMM, str(best), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=tmp_path, env=env, timeout=120)
    return torch.load(tmp_path / "y.pt")


@pytest.mark.parametrize("name,head", [("resnet18", "single"), ("vit_tiny_patch16_224", "single"),
                                       ("convnext_atto", "multi")])
def test_save_for_timm_loads_in_plain_timm(tmp_path: Path, name: str, head: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 18, img_size=32, head=head).eval()
    best = tmp_path / "run" / "best"
    save_for_timm(model, best, model_name=name, num_classes=18, label_names=NAMES, img_size=32, crop_pct=0.9,
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), extra={"val_macro_f1": 0.5})
    assert sorted(p.name for p in best.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    assert [p.name for p in best.parent.iterdir()] == ["best"]  # no temp folder left behind
    cfg = json.loads((best / "config.json").read_text())
    assert cfg["architecture"] == name and cfg["num_classes"] == 18 and cfg["label_names"] == NAMES
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["pretrained_cfg"]["crop_pct"] == 0.9
    assert json.loads((best / "metrics.json").read_text()) == {"val_macro_f1": 0.5}

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    got = _timm_subprocess(best, x, tmp_path)
    if head == "multi":  # folded heads: same softmax, logits shifted by a per-sample constant
        torch.testing.assert_close(torch.log_softmax(got, 1), want, atol=1e-5, rtol=0)
    else:
        assert torch.equal(got, want)

    loaded, info = load_trained(best)
    with torch.no_grad():
        torch.testing.assert_close(torch.log_softmax(loaded(x), 1), torch.log_softmax(want, 1), atol=1e-5, rtol=0)
    assert info["label_names"] == NAMES and info["head"] == head and info["input_size"] == (3, 32, 32)
    assert info["mean"] == (0.5, 0.5, 0.5) and info["std"] == (0.25, 0.25, 0.25) and info["crop_pct"] == 0.9
    assert info["metrics"] == {"val_macro_f1": 0.5}


def test_save_for_timm_replaces_old_export(tmp_path: Path) -> None:
    model = torch.compile(create_model("resnet18", 18).eval())  # exported through the compile wrapper
    kw = dict(model_name="resnet18", num_classes=18, label_names=NAMES, img_size=None, crop_pct=0.9,
              mean=(0.5,) * 3, std=(0.5,) * 3)
    save_for_timm(model, tmp_path / "best", extra={"step": 1}, **kw)
    save_for_timm(model, tmp_path / "best", extra={"step": 2}, **kw)
    assert json.loads((tmp_path / "best" / "metrics.json").read_text()) == {"step": 2}
    assert json.loads((tmp_path / "best" / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert [p.name for p in tmp_path.iterdir()] == ["best"]
    loaded, _ = load_trained(tmp_path / "best")
    assert _same_state(loaded, model._orig_mod)


def test_load_trained_rejects_incomplete_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config.json"):
        load_trained(tmp_path)


# ----------------------------------------------------------------------------- multi head
def test_multi_head_class_arithmetic() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", 18, head="multi").eval()
    assert isinstance(model, MultiHeadModel) and model.num_classes == 18
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        mask, gender, age = model.forward_heads(x)
        out = model(x)
    assert out.shape == (4, 18)
    lm, lg, la = (torch.log_softmax(t, 1) for t in (mask, gender, age))
    for c in range(18):
        m, g, a = L.decode(c)
        assert c == m * 6 + g * 3 + a
        torch.testing.assert_close(out[:, c], lm[:, m] + lg[:, g] + la[:, a])
    torch.testing.assert_close(out.exp().sum(1), torch.ones(4))  # a proper 18-class distribution
    pred = out.argmax(1)
    for i in range(4):
        assert L.decode(int(pred[i])) == (int(mask[i].argmax()), int(gender[i].argmax()), int(age[i].argmax()))


def test_multi_head_loss_and_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet18", 18, head="multi")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 7, 13, 17])
    heads = model.forward_heads(x)
    m, g, a = torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 1, 2])
    ce = [torch.nn.functional.cross_entropy(h, t) for h, t in zip(heads, (m, g, a))]
    torch.testing.assert_close(multi_head_loss(heads, y, weights=(1.0, 2.0, 0.5)), ce[0] + 2 * ce[1] + 0.5 * ce[2])
    # with unit weights the heads' CE sum is the 18-class CE of the combined output
    torch.testing.assert_close(multi_head_loss(heads, y), torch.nn.functional.cross_entropy(model(x), y))
    # the plain 18-class output (what a DDP-wrapped model returns) gives the same loss and gradients
    kw = dict(weights=(1.0, 2.0, 0.5), smoothing=0.1)
    params = [model.mask_head.weight, model.age_head.bias, model.backbone.conv1.weight]
    want = torch.autograd.grad(multi_head_loss(model.forward_heads(x), y, **kw), params)
    got_loss = multi_head_loss(model(x), y, **kw)
    torch.testing.assert_close(got_loss, multi_head_loss(heads, y, **kw))
    for g_got, g_want in zip(torch.autograd.grad(got_loss, params), want):
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError):
        multi_head_loss(torch.zeros(3, 5), y[:3])
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    again = create_model("resnet18", 18, head="multi")
    again.load_state_dict(safetensors.torch.load_file(str(tmp_path / "m.safetensors")))
    assert _same_state(again, model)
