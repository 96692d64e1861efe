"""Real-photo stand-in for benchmarks (`python tests/scripts/real_photos.py RAW` after
`python -m dist_train.synth --out RAW --size 384 ...`): the mask layout of dist_train.synth, every image replaced by a random
384x512 crop (area 0.35-1 of the largest 3:4 window, flipped at random, brightness 0.8-1.2) of one
of the three real photos that ship with scikit-learn and matplotlib (china.jpg, flower.jpg,
grace_hopper.jpg), saved as JPEG quality 92. Only the `.jpg` files are replaced; the synthetic
set's other extensions (.jpeg, .JPG, .png, ...) keep their synthetic faces."""
import random, sys
from pathlib import Path
import sklearn, matplotlib
from PIL import Image, ImageEnhance
out = Path(sys.argv[1])
srcs = [Image.open(p).convert("RGB") for p in (
    Path(sklearn.__file__).parent / "datasets/images/china.jpg",
    Path(sklearn.__file__).parent / "datasets/images/flower.jpg",
    Path(matplotlib.get_data_path()) / "sample_data/grace_hopper.jpg")]
rng = random.Random(0)
files = sorted(out.rglob("*.jpg"))
for f in files:
    im = rng.choice(srcs)
    W, H = im.size
    h0 = min(H, W * 4 // 3); w0 = h0 * 3 // 4
    s = rng.uniform(0.35, 1.0) ** 0.5
    w, h = max(48, int(w0 * s)), max(64, int(h0 * s))
    x, y = rng.randint(0, W - w), rng.randint(0, H - h)
    c = im.crop((x, y, x + w, y + h)).resize((384, 512), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        c = c.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    c = ImageEnhance.Brightness(c).enhance(rng.uniform(0.8, 1.2))
    c.save(f, format="JPEG", quality=92)
print(len(files), "photos")
