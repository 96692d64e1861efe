"""Synthetic stand-in for the mask-status competition data, in its exact on-disk layout.

Tests and demos need the real layout and its quirks (mixed extensions, AppleDouble junk,
.ipynb_checkpoints, dot-files) without the real photos, and pictures whose content follows
the 18 classes so a tiny CNN can actually learn them at 32-64 px:

- mask: a light-blue mask over nose and mouth (wear), over the mouth only with the nose
  showing (incorrect), or none (not worn);
- gender: long hair falling beside the face (female) or a short cap of hair (male);
- age group: dark hair (<30), grey hair (30-59), white hair plus forehead wrinkles (>=60).

Everything derives from the seed through per-image generators, so the same arguments give
byte-identical files.

    python -m dist_train.synth --out DIR [--persons N] [--seed S] [--size PX] [--eval-persons M]
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dist_train.errors import ArgParser, UserError, check_writable_dir, cli_main, replace_dir, temp_dir
from .labels import GENDER_NAMES, MASK_STEMS, age_group, encode

STEMS: tuple[str, ...] = tuple(MASK_STEMS)  # mask1..mask5, incorrect_mask, normal
# Extension per image, weighted like the real set (mostly .jpg). Person 0 carries every
# variant so even a tiny set exercises all of them.
EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".PNG", ".JPEG")
EXT_WEIGHTS = np.array([0.72, 0.10, 0.10, 0.04, 0.02, 0.02])
PERSON0_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".JPG", ".PNG", ".JPEG", ".jpg")
# Which person folders get junk (by index), so every set of a few persons has some of each.
APPLEDOUBLE_EVERY, CHECKPOINT_EVERY, DSSTORE_EVERY = 5, 9, 11
APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "
JPEG_QUALITY = 92

# (gender, age) cover list: its first 6 entries hit every (gender, age group) cell, its 12
# entries give every cell two persons and both genders the edge ages 29, 30, 59, 60.
# None = a random age within that entry's group.
COVER: tuple[tuple[int, int | None, int], ...] = (
    (0, 29, 0), (1, 29, 0), (0, 30, 1), (1, 30, 1), (0, 60, 2), (1, 60, 2),
    (0, 59, 1), (1, 59, 1), (0, None, 0), (1, None, 0), (0, None, 2), (1, None, 2),
)
AGE_RANGES = ((18, 29), (30, 59), (60, 74))
AGE_GROUP_WEIGHTS = np.array([0.45, 0.40, 0.15])  # >=60 is rare, as in the real data
FEMALE_SHARE = 0.6

SPLIT_TRAIN, SPLIT_EVAL = 0, 1


@dataclass(frozen=True)
class Person:
    index: int
    gender: int
    age: int
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    clothes: tuple[int, int, int]
    background_hue: float


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _demographics(n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(gender, age) for n persons: the cover list first, then draws, then shuffled."""
    out: list[tuple[int, int]] = []
    for gender, age, grp in COVER[:n]:
        lo, hi = AGE_RANGES[grp]
        out.append((gender, age if age is not None else int(rng.integers(lo, hi + 1))))
    for _ in range(n - len(out)):
        gender = int(rng.random() < FEMALE_SHARE)
        lo, hi = AGE_RANGES[int(rng.choice(3, p=AGE_GROUP_WEIGHTS))]
        out.append((gender, int(rng.integers(lo, hi + 1))))
    order = rng.permutation(n)
    return [out[i] for i in order]


def _hair_colour(grp: int, rng: np.random.Generator) -> tuple[int, int, int]:
    if grp == 0:  # dark brown / black
        v = rng.integers(25, 60)
        return (int(v + 15), int(v + 5), int(v))
    if grp == 1:  # grey
        v = int(rng.integers(120, 150))
        return (v, v, v + 5)
    v = int(rng.integers(228, 250))  # white
    return (v, v, v)


def _make_person(index: int, gender: int, age: int, seed: int, split: int) -> Person:
    rng = _rng(seed, split, index, 1)
    tone = rng.uniform(-30, 20)
    skin = tuple(int(np.clip(c + tone, 0, 255)) for c in (226, 190, 160))
    # Background and clothes avoid the mask's blue; the background stays mid-saturated so
    # achromatic hair (dark / grey / white) contrasts with it.
    clothes = _colour(_not_blue_hue(rng), rng.uniform(0.3, 0.8), rng.uniform(0.3, 0.9))
    return Person(index, gender, age, skin, _hair_colour(age_group(age), rng), clothes, _not_blue_hue(rng))  # type: ignore[arg-type]


def _not_blue_hue(rng: np.random.Generator) -> float:
    """A hue outside cyan..blue (0.42..0.75), where the mask colour lives."""
    h = rng.uniform(0.0, 0.67)
    return float(h if h < 0.42 else h + 0.33)


def _colour(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    return tuple(int(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val))  # type: ignore[return-value]


def _jitter(colour: Sequence[int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)  # type: ignore[return-value]


def _draw(person: Person, mask: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One portrait (size x 4/3*size), drawn at 2x then downsampled for smooth edges."""
    w, h = 2 * size, 2 * round(size * 4 / 3)
    img = Image.new("RGB", (w, h), _colour(person.background_hue, rng.uniform(0.25, 0.55), rng.uniform(0.45, 0.85)))
    d = ImageDraw.Draw(img)

    scale = rng.uniform(0.9, 1.1)
    fw, fh = 0.46 * w * scale, 0.40 * h * scale
    cx = w / 2 + rng.uniform(-0.07, 0.07) * w
    top = 0.22 * h + rng.uniform(-0.06, 0.06) * h
    left, bottom = cx - fw / 2, top + fh

    def fx(t: float) -> float:
        return left + t * fw

    def fy(t: float) -> float:
        return top + t * fh

    d.ellipse([cx - 0.95 * fw, bottom + 0.12 * fh, cx + 0.95 * fw, bottom + 1.4 * fh], fill=person.clothes)
    d.rectangle([fx(0.38), fy(0.9), fx(0.62), fy(1.2)], fill=person.skin)  # neck
    hair = _jitter(person.hair, rng, 6)
    if person.gender == 1:  # long hair behind the face, down past the chin
        d.rounded_rectangle([fx(-0.2), fy(-0.14), fx(1.2), fy(1.35)], radius=0.35 * fw, fill=hair)
    d.ellipse([left, top, left + fw, bottom], fill=person.skin)
    if person.gender == 1:
        d.chord([fx(-0.05), fy(-0.14), fx(1.05), fy(0.55)], 180, 360, fill=hair)
    else:  # short cap of hair
        d.chord([fx(0.02), fy(-0.1), fx(0.98), fy(0.42)], 180, 360, fill=hair)
    if age_group(person.age) == 2:  # forehead wrinkles
        for t in (0.26, 0.32):
            d.line([fx(0.3), fy(t), fx(0.7), fy(t)], fill=(120, 80, 60), width=max(1, round(0.02 * fh)))
    eye = 0.05 * fw
    for ex in (0.32, 0.68):
        d.ellipse([fx(ex) - eye, fy(0.44) - eye, fx(ex) + eye, fy(0.44) + eye], fill=(30, 25, 25))
    d.ellipse([fx(0.44), fy(0.55), fx(0.56), fy(0.65)], fill=(150, 80, 60))  # nose
    d.ellipse([fx(0.36), fy(0.75), fx(0.64), fy(0.82)], fill=(190, 40, 50))  # mouth
    if mask != 2:
        mtop = 0.50 if mask == 0 else 0.70  # incorrect: below the nose, mouth covered
        colour = _jitter((95, 175, 235), rng, 12)
        d.polygon(
            [(fx(0.04), fy(mtop)), (fx(0.96), fy(mtop)), (fx(0.9), fy(0.9)), (fx(0.5), fy(1.04)), (fx(0.1), fy(0.9))],
            fill=colour,
        )
        d.line([fx(0.04), fy(mtop), fx(-0.02), fy(0.4)], fill=(235, 235, 235), width=max(1, round(0.02 * fw)))
        d.line([fx(0.96), fy(mtop), fx(1.02), fy(0.4)], fill=(235, 235, 235), width=max(1, round(0.02 * fw)))

    small = np.asarray(img.resize((size, h // 2), Image.Resampling.LANCZOS), dtype=np.float32)
    noisy = small + rng.normal(0.0, rng.uniform(2.0, 7.0), size=small.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _encode(img: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    if ext.lower() == ".png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _image(person: Person, stem_index: int, size: int, seed: int, split: int) -> Image.Image:
    rng = _rng(seed, split, person.index, 2, stem_index)
    return _draw(person, MASK_STEMS[STEMS[stem_index]], size, rng)


def _write_train(root: Path, persons: int, seed: int, size: int) -> dict[str, int]:
    rng = _rng(seed, SPLIT_TRAIN, 0)
    images = root / "images"
    images.mkdir(parents=True)
    rows: list[list[str]] = []
    pid = 0
    counts = {"appledouble": 0, "checkpoints": 0, "dotfiles": 0}
    for i, (gender, age) in enumerate(_demographics(persons, rng)):
        pid += 1 + int(rng.random() < 0.3)  # the real ids have gaps
        person = _make_person(i, gender, age, seed, SPLIT_TRAIN)
        folder = f"{pid:06d}_{GENDER_NAMES[gender]}_Asian_{age}"
        rows.append([f"{pid:06d}", GENDER_NAMES[gender], "Asian", str(age), folder])
        pdir = images / folder
        pdir.mkdir()
        exts = PERSON0_EXTENSIONS if i == 0 else [EXTENSIONS[k] for k in rng.choice(len(EXTENSIONS), 7, p=EXT_WEIGHTS)]
        for s, (stem, ext) in enumerate(zip(STEMS, exts)):
            (pdir / f"{stem}{ext}").write_bytes(_encode(_image(person, s, size, seed, SPLIT_TRAIN), ext))
        if i % APPLEDOUBLE_EVERY == 0:
            junk = APPLEDOUBLE_MAGIC + rng.bytes(int(rng.integers(200, 4000)))
            (pdir / f"._{STEMS[0]}{exts[0]}").write_bytes(junk)
            counts["appledouble"] += 1
        if i % CHECKPOINT_EVERY == 1:
            ckpt = pdir / ".ipynb_checkpoints"
            ckpt.mkdir()
            shutil.copyfile(pdir / f"{STEMS[0]}{exts[0]}", ckpt / f"{STEMS[0]}-checkpoint{exts[0]}")
            counts["checkpoints"] += 1
        if i % DSSTORE_EVERY == 2:
            (pdir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
            counts["dotfiles"] += 1
    ckpt = images / ".ipynb_checkpoints"
    ckpt.mkdir()
    (ckpt / "train-checkpoint.csv").write_text("id,gender,race,age,path\n")
    counts["checkpoints"] += 1
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
    counts["dotfiles"] += 1
    _write_csv(root / "train.csv", ["id", "gender", "race", "age", "path"], rows)
    return counts


def _write_eval(root: Path, persons: int, seed: int, size: int) -> None:
    """Shuffled single images named by a sha1, like the competition's eval set."""
    rng = _rng(seed, SPLIT_EVAL, 0)
    images = root / "images"
    images.mkdir(parents=True)
    entries: list[tuple[str, int]] = []
    for i, (gender, age) in enumerate(_demographics(persons, rng)):
        person = _make_person(i, gender, age, seed, SPLIT_EVAL)
        for s, stem in enumerate(STEMS):
            image_id = hashlib.sha1(f"synth/{seed}/{i}/{stem}".encode()).hexdigest() + ".jpg"
            (images / image_id).write_bytes(_encode(_image(person, s, size, seed, SPLIT_EVAL), ".jpg"))
            entries.append((image_id, encode(MASK_STEMS[stem], gender, age_group(age))))
    entries = [entries[k] for k in rng.permutation(len(entries))]
    _write_csv(root / "info.csv", ["ImageID", "ans"], [[iid, "0"] for iid, _ in entries])
    _write_csv(root / "labels.csv", ["ImageID", "label"], [[iid, str(lbl)] for iid, lbl in entries])


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def make_dataset(
    out: Path,
    persons: int = 60,
    seed: int = 0,
    size: int = 64,
    eval_persons: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic competition folder at `out` (train/ and eval/); returns counts.

    `eval_persons` defaults to a quarter of `persons` (at least 1). The folder is built
    beside `out` and renamed into place, so `out` is never half written.
    """
    out = Path(out)
    if persons < 1:
        raise UserError(f"--persons {persons}: expected at least 1")
    if seed < 0:
        raise UserError(f"--seed {seed}: expected 0 or more")
    eval_n = max(1, persons // 4) if eval_persons is None else eval_persons
    if eval_n < 0:
        raise UserError(f"--eval-persons {eval_n}: expected 0 or more")
    if size < 16:
        raise UserError(f"--size {size}: expected at least 16 px (the image's shorter side)")
    check_writable_dir(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: folder exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, out.name)
    try:
        junk = _write_train(tmp / "train", persons, seed, size)
        _write_eval(tmp / "eval", eval_n, seed, size)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "persons": persons,
        "train_images": persons * len(STEMS),
        "eval_persons": eval_n,
        "eval_images": eval_n * len(STEMS),
        **junk,
    }


@cli_main
def main(argv: list[str] | None = None) -> dict:
    p = ArgParser(prog="python -m dist_train.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder to create (gets train/ and eval/)")
    p.add_argument("--persons", type=int, default=60, help="training persons, 7 images each (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="shorter image side in px; portrait 3:4 (default 64)")
    p.add_argument("--eval-persons", type=int, default=None, help="eval persons (default persons/4, at least 1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    a = p.parse_args(argv)
    s = make_dataset(a.out, a.persons, a.seed, a.size, a.eval_persons, overwrite=a.overwrite)
    print(
        f"wrote {a.out}: {s['persons']} persons / {s['train_images']} train images, "
        f"{s['eval_persons']} persons / {s['eval_images']} eval images, junk: {s['appledouble']} appledouble, "
        f"{s['checkpoints']} checkpoints, {s['dotfiles']} dotfiles",
        flush=True,
    )
    return s


if __name__ == "__main__":
    main()
