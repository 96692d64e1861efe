"""Test-time augmentation (dist_train.infer.tta): the spec, the views, probabilities averaged, and a
bad spec answered with one line for predict, evaluate and training's --val-tta."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from conftest import run_main
from dist_train import evaluate, predict
from dist_train.errors import UserError
from dist_train.infer.tta import TTA, parse_tta, zoom


@pytest.mark.parametrize("spec, want, views", [
    ("none", TTA(), 1),
    ("hflip", TTA(hflip=True), 2),
    ("five-crop", TTA(five_crop=True), 5),
    ("hflip,five-crop", TTA(hflip=True, five_crop=True), 10),
    ("five-crop, hflip", TTA(hflip=True, five_crop=True), 10),
    ("scales:0.875/1.0", TTA(scales=(0.875, 1.0)), 2),
    ("hflip,scales:1.25", TTA(hflip=True, scales=(1.25,)), 2),
    ("five-crop,scales:0.9/1.1,hflip", TTA(hflip=True, five_crop=True, scales=(0.9, 1.1)), 14),
])
def test_good_specs(spec: str, want: TTA, views: int) -> None:
    tta = parse_tta(spec)
    assert tta == want and tta.num_views == views
    x = torch.randn(2, 3, 16, 16)
    assert [tuple(v.shape) for v in tta.views(x)] == [(2, 3, 16, 16)] * views


BAD_SPECS = [
    ("", "unknown view ''"),
    ("flip", "unknown view 'flip'"),
    ("hflip,", "unknown view ''"),
    ("none,hflip", "none does not combine with views"),
    ("hflip,hflip", "hflip given twice"),
    ("scales:1.0,scales:2.0", "scales given twice"),
    ("scales:", "scales '': expected distinct numbers in (0, 4]"),
    ("scales:0.5/x", "scales '0.5/x'"),
    ("scales:0", "scales '0'"),
    ("scales:1/1.0", "scales '1/1.0'"),
    ("scales:nan", "scales 'nan'"),
    ("scales:8", "scales '8'"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS, ids=[b[0] or "empty" for b in BAD_SPECS])
def test_bad_spec_is_one_line_exit_2(spec: str, message: str, capsys, tmp_path) -> None:
    """predict and evaluate refuse the spec before loading anything."""
    with pytest.raises(UserError, match="expected"):
        parse_tta(spec)
    for main in (predict.main, evaluate.main):
        with pytest.raises(SystemExit) as e:
            main(["--run", str(tmp_path / "missing"), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                  "--tta", spec])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --tta {spec!r}: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_bad_val_tta_is_refused_before_the_run_starts(mask_shards, tmp_path) -> None:
    p = run_main(["--data", str(mask_shards), "--output", str(tmp_path / "run"), "--model", "test_resnet",
                  "--workers", "0", "--val-tta", "hflip,ten-crop"])
    assert p.returncode == 2 and p.stderr.startswith("error: --val-tta 'hflip,ten-crop': unknown view 'ten-crop'")
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


class Corners(torch.nn.Module):
    """3 logits: the top-left and top-right pixels of channel 0, and 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], torch.zeros(x.shape[0])], dim=1)


def test_probabilities_are_averaged_not_logits() -> None:
    """Image (log 3, 0): logits (log 3, 0, 0) -> p (.6, .2, .2); mirrored (0, log 3, 0) -> (.2, .6, .2).
    The mean probability is (.4, .4, .2); averaging logits would give (log 3 / 2, log 3 / 2, 0) ->
    (sqrt 3, sqrt 3, 1) / (2 sqrt 3 + 1) = (.388, .388, .224)."""
    x = torch.tensor([[[[math.log(3.0), 0.0]]]])
    out = TTA(hflip=True).predict(Corners(), x)
    torch.testing.assert_close(out.exp(), torch.tensor([[0.4, 0.4, 0.2]]))
    torch.testing.assert_close(out, torch.log(torch.tensor([[0.4, 0.4, 0.2]])))  # logits = log mean probability
    r3 = math.sqrt(3.0)
    assert abs(out.exp()[0, 0].item() - r3 / (2 * r3 + 1)) > 0.01
    torch.testing.assert_close(TTA().predict(Corners(), x), torch.tensor([[math.log(3.0), 0.0, 0.0]]))  # one view: raw


def test_five_crop_and_scales_views() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    crops = list(TTA(five_crop=True).views(x))
    enlarged = TF.resize(x, [9, 9], antialias=True)  # round(8 / 0.875) = 9
    for i in range(2):  # torchvision's FiveCrop: top-left, top-right, bottom-left, bottom-right, centre
        for got, want in zip(crops, T.FiveCrop(8)(enlarged[i])):
            torch.testing.assert_close(got[i], want)
    flipped = list(TTA(hflip=True, five_crop=True).views(x))
    assert len(flipped) == 10 and all(torch.equal(flipped[2 * k], crops[k]) for k in range(5))
    assert all(torch.equal(flipped[2 * k + 1], crops[k].flip(3)) for k in range(5))
    assert torch.equal(zoom(x, 1.0), x)
    torch.testing.assert_close(zoom(x, 2.0), TF.resize(x, [16, 16], antialias=True)[..., 4:12, 4:12])  # zoom in
    small = zoom(torch.ones(1, 3, 8, 8), 0.5)  # zoom out: the image at 4x4 in the centre, mean colour (0) around
    assert torch.equal(small[..., 2:6, 2:6], torch.ones(1, 3, 4, 4)) and small.sum() == 3 * 16
    cl = x.contiguous(memory_format=torch.channels_last)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in parse_tta("hflip,five-crop").views(cl))
