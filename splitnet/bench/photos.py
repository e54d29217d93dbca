"""Real photos as 224x224 inputs: seeded crops, scales and flips of the photos that scikit-image
and scikit-learn ship (no download), with a calibration / held-out split by photo and by crop.

Sources are the photos in ``skimage.data.data_dir`` (only files present there are used) and
sklearn's ``load_sample_images()`` (china, flower). The two motorcycle images are a stereo pair of
one scene, so they are one source. Every crop is a square window (a side of 35-100 % of the
photo's short side, at a seeded position, mirrored or not) resized to 224x224 (bicubic).

The split holds out whole photos (``HELD_OUT_SOURCES``: never seen at calibration) and, of the other
photos, a seeded fraction of the crops; no crop is in both sets. Fidelity is reported on the
held-out set only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

#: source name -> files in skimage's data directory (gray photos are repeated to RGB)
SKIMAGE_PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "chelsea": ("chelsea.png",),
    "coffee": ("coffee.png",),
    "rocket": ("rocket.jpg",),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
    "hubble_deep_field": ("hubble_deep_field.jpg",),
    "retina": ("retina.jpg",),
    "ihc": ("ihc.png",),
    "camera": ("camera.png",),
    "coins": ("coins.png",),
    "moon": ("moon.png",),
}
SKLEARN_PHOTOS = ("china", "flower")
#: whole photos kept out of calibration
HELD_OUT_SOURCES = ("rocket", "flower", "coins")
IMAGE_SIZE = 224


@dataclass(frozen=True)
class Crop:
    """One input: a square window of a photo, mirrored or not, resized to 224x224.

    Attributes:
        source: the photo's source name (see SKIMAGE_PHOTOS / SKLEARN_PHOTOS).
        image: index of the image within its source (the motorcycle pair has two).
        top_px, left_px, side_px: the window in the photo's pixels.
        mirrored: flipped left-right after cropping.
    """

    source: str
    image: int
    top_px: int
    left_px: int
    side_px: int
    mirrored: bool

    @property
    def key(self) -> tuple:
        return (self.source, self.image, self.top_px, self.left_px, self.side_px, self.mirrored)


@lru_cache(maxsize=1)
def photos() -> dict[str, tuple[np.ndarray, ...]]:
    """Every available source photo as RGB uint8 (H, W, 3), by source name, in a fixed order."""
    from PIL import Image

    out: dict[str, tuple[np.ndarray, ...]] = {}
    try:
        import skimage.data

        data_dir = Path(skimage.data.data_dir)
    except ImportError:
        data_dir = None
    if data_dir is not None:
        for name, files in SKIMAGE_PHOTOS.items():
            paths = [data_dir / f for f in files]
            if all(p.is_file() for p in paths):
                out[name] = tuple(_rgb(np.asarray(Image.open(p))) for p in paths)
    try:
        from sklearn.datasets import load_sample_images

        sample = load_sample_images()
        for path, img in zip(sample.filenames, sample.images):
            name = Path(path).stem
            if name in SKLEARN_PHOTOS:
                out[name] = (_rgb(img),)
    except ImportError:
        pass
    if len(out) < 4:
        raise RuntimeError(f"only {len(out)} bundled photos found (scikit-image and scikit-learn ship them): pip install scikit-image scikit-learn")
    return out


def _rgb(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def photo_crops(per_source: int = 90, seed: int = 0) -> list[Crop]:
    """``per_source`` distinct crops of every source photo (>= 1,000 in all with the default)."""
    crops: list[Crop] = []
    for name, images in photos().items():
        rng = np.random.default_rng([seed, int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)])
        seen: set[tuple] = set()
        while len(seen) < per_source:
            image = int(rng.integers(len(images)))
            h, w = images[image].shape[:2]
            short = min(h, w)
            side = int(rng.integers(int(0.35 * short), short + 1))
            crop = Crop(name, image, int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1)), side, bool(rng.integers(2)))
            if crop.key not in seen:
                seen.add(crop.key)
                crops.append(crop)
    return crops


def split_crops(crops: list[Crop], held_out_fraction: float = 0.25, seed: int = 0,
                held_out_sources: tuple[str, ...] = HELD_OUT_SOURCES) -> tuple[list[Crop], list[Crop]]:
    """(calibration, held_out): every crop of a held-out photo, and ``held_out_fraction`` of the
    crops of each other photo, are held out."""
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    rng = np.random.default_rng(seed)
    held = rng.random(len(crops)) < held_out_fraction
    calibration = [c for c, h in zip(crops, held) if not h and c.source not in held_out_sources]
    held_out = [c for c, h in zip(crops, held) if h or c.source in held_out_sources]
    return calibration, held_out


def crop_pixels(crop: Crop, size: int = IMAGE_SIZE) -> np.ndarray:
    """The crop as RGB uint8 (size, size, 3)."""
    from PIL import Image

    img = _pil_photo(crop.source, crop.image)
    box = (crop.left_px, crop.top_px, crop.left_px + crop.side_px, crop.top_px + crop.side_px)
    out = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box))
    return np.ascontiguousarray(out[:, ::-1] if crop.mirrored else out)


@lru_cache(maxsize=32)
def _pil_photo(source: str, image: int):
    from PIL import Image

    return Image.fromarray(photos()[source][image])


def pixel_values(crops: list[Crop]) -> np.ndarray:
    """EfficientNet-Lite inputs (N, 3, 224, 224) float32 for ``crops``."""
    from splitnet.model.efficientnet import to_pixel_values

    return np.stack([to_pixel_values(crop_pixels(c)) for c in crops]) if crops else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)


def whole_photo_predictions(bm, top: int = 5) -> dict[str, list[tuple[str, float]]]:
    """Top-``top`` ImageNet classes (name, probability) of the unsplit model for each whole photo
    (center crop, as the weights' evaluation preprocessing)."""
    import torch

    from splitnet.model.efficientnet import imagenet_class_names, preprocess

    names = imagenet_class_names()
    full = bm.full()
    out: dict[str, list[tuple[str, float]]] = {}
    for source, images in photos().items():
        x = torch.from_numpy(preprocess(images[0]))[None]
        with torch.no_grad():
            p = full({"pixel_values": x})["logits"].softmax(-1)[0]
        v, i = p.topk(top)
        out[source] = [(names[int(j)], round(float(a), 4)) for a, j in zip(v, i)]
    return out
