"""The photo set: real bundled photos, >= 1,000 distinct seeded crops, a split by photo and by crop."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from splitnet.bench import photos as P  # noqa: E402


def test_sources_are_real_photos():
    srcs = P.photos()
    assert {"chelsea", "coffee", "astronaut", "china", "flower"} <= set(srcs)
    for images in srcs.values():
        for img in images:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 224 // 2


def test_at_least_1000_distinct_crops_deterministic():
    a, b = P.photo_crops(), P.photo_crops()
    assert len(a) >= 1000
    assert [c.key for c in a] == [c.key for c in b]
    assert len({c.key for c in a}) == len(a)
    assert [c.key for c in P.photo_crops(seed=1)] != [c.key for c in a]
    sample = a[:: len(a) // 40]
    pix = [P.crop_pixels(c) for c in sample]
    assert all(p.shape == (224, 224, 3) and p.dtype == np.uint8 for p in pix)
    assert len({hashlib.sha256(p.tobytes()).hexdigest() for p in pix}) == len(pix)  # distinct images, not only keys
    assert np.array_equal(P.crop_pixels(sample[3]), pix[3])
    assert any(c.mirrored for c in a) and any(not c.mirrored for c in a)


def test_split_is_disjoint_by_photo_and_by_crop():
    crops = P.photo_crops()
    cal, held = P.split_crops(crops)
    assert len(cal) + len(held) == len(crops)
    assert not {c.key for c in cal} & {c.key for c in held}
    assert not {c.source for c in cal} & set(P.HELD_OUT_SOURCES)
    held_sources = {c.source for c in held}
    assert set(P.HELD_OUT_SOURCES) <= held_sources
    assert held_sources - set(P.HELD_OUT_SOURCES)  # unseen crops of seen photos too
    cal2, held2 = P.split_crops(P.photo_crops())
    assert [c.key for c in held2] == [c.key for c in held]
    with pytest.raises(ValueError):
        P.split_crops(crops, held_out_fraction=1.0)


def test_pixel_values_are_model_inputs():
    x = P.pixel_values(P.photo_crops()[:3])
    assert x.shape == (3, 3, 224, 224) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
