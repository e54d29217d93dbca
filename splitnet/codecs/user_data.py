"""The user's own calibration inputs for ``splitnet calibrate --data PATH``.

- a folder of images (.jpg .jpeg .png .bmp .webp .tif .tiff) for vision models;
- a text file (UTF-8; one input per non-empty line, or per blank-line-separated paragraph when
  ``--text-unit paragraph``) for encoders and LMs;
- token ids: a ``.npy`` array (N, T) or (T,), or a ``.txt`` of whitespace-separated integers (one
  sequence per line), for LMs and encoders.

Every item is one model input with its own raw size (the bytes cloud-only would send: the image
file, the UTF-8 text, the ids at the narrowest integer width of the vocabulary). Items are split
into calibration and held-out sets by item, seeded, before any feature is computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitnet.errors import ConfigError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class UserItem:
    """One input: ``inputs`` for the model's first stage (numpy arrays), its name and raw size."""

    name: str
    inputs: dict[str, np.ndarray]
    raw_nbytes: int


@dataclass(frozen=True)
class UserData:
    kind: str  # "images" | "text" | "token_ids"
    path: Path
    calibration: list[UserItem]
    held_out: list[UserItem]


def data_kind(path: Path) -> str:
    """What ``path`` holds: images (a folder), token ids (.npy, or a .txt of integers) or text."""
    if path.is_dir():
        return "images"
    if not path.is_file():
        raise ConfigError(f"--data {path} does not exist; pass a folder of images, a text file, or a .npy/.txt of token ids")
    if path.suffix == ".npy":
        return "token_ids"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise ConfigError(f"--data {path} is one image; pass the folder that holds your images")
    head = path.read_text(encoding="utf-8", errors="replace")[:20_000].split()
    if head and all(t.lstrip("-").isdigit() for t in head):
        return "token_ids"
    return "text"


def load_user_data(path: str | Path, bm: Any, *, held_out_fraction: float = 0.2, seed: int = 0,
                   max_items: int | None = None, max_tokens_per_item: int = 256, text_unit: str = "line") -> UserData:
    """Read ``path`` as inputs for ``bm`` and split them; every problem is a ConfigError naming the fix."""
    path = Path(path).expanduser()
    kind = data_kind(path)
    if not 0.0 < held_out_fraction < 1.0:
        raise ConfigError(f"--held-out must be in (0, 1), got {held_out_fraction}")
    if kind == "images":
        if bm.kind != "vision":
            raise ConfigError(f"--data {path} is a folder of images, but {bm.name} is a {bm.kind} model; pass a text file or token ids")
        items = _images(path, bm)
    else:
        if bm.kind not in ("encoder", "decoder"):
            raise ConfigError(f"--data {path} holds {kind.replace('_', ' ')}, but {bm.name} is a {bm.kind} model; pass a folder of images")
        if kind == "text":
            items = _texts(path, bm, max_tokens_per_item, text_unit)
        else:
            items = _token_ids(path, bm, max_tokens_per_item)
    if max_items is not None:
        items = items[:max_items]
    if len(items) < 2:
        raise ConfigError(f"--data {path} gave {len(items)} input(s); calibration needs at least 2 (one is held out to measure fidelity)")
    order = np.random.default_rng(seed).permutation(len(items))
    n_held = min(len(items) - 1, max(1, int(round(held_out_fraction * len(items)))))
    held = set(order[:n_held].tolist())
    return UserData(kind, path, [it for i, it in enumerate(items) if i not in held], [it for i, it in enumerate(items) if i in held])


def _images(folder: Path, bm: Any) -> list[UserItem]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"--data {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    items = []
    for f in files:
        try:
            with Image.open(f) as img:
                rgb = np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ConfigError(f"cannot read image {f}: {e}; remove it from --data or convert it") from e
        items.append(UserItem(str(f.relative_to(folder)), {"pixel_values": image_input(bm, rgb)}, f.stat().st_size))
    return items


def image_input(bm: Any, rgb: np.ndarray) -> np.ndarray:
    """pixel_values (1, C, S, S) for ``bm``: the model's own preprocessing when it has one
    (EfficientNet-Lite), else a center crop resized to the config's image_size, scaled to [-1, 1]."""
    from splitnet.model.efficientnet import EfficientNetLiteArchitecture, preprocess

    if isinstance(bm.arch, EfficientNetLiteArchitecture):
        return preprocess(rgb, size=bm.arch.image_size)[None]
    from PIL import Image

    size = int(bm.arch.config.get("image_size", 224))
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = Image.fromarray(rgb[top : top + side, left : left + side]).resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    channels = int(bm.arch.config.get("num_channels", 3))
    x = x.mean(-1, keepdims=True) if channels == 1 else x
    return np.ascontiguousarray(x.transpose(2, 0, 1))[None]


def _texts(path: Path, bm: Any, max_tokens: int, unit: str) -> list[UserItem]:
    if bm.tokenizer is None:
        raise ConfigError(f"{bm.name} has no tokenizer: pass token ids (.npy or a .txt of integers) instead of text")
    text = path.read_text(encoding="utf-8", errors="replace")
    if unit == "line":
        pieces = [t.strip() for t in text.splitlines()]
    elif unit == "paragraph":
        pieces = [" ".join(p.split()) for p in text.split("\n\n")]
    else:
        raise ConfigError(f"--text-unit must be line or paragraph, got {unit!r}")
    pieces = [p for p in pieces if p]
    items = []
    for i, piece in enumerate(pieces):
        enc = bm.tokenize([piece], max_length=max_tokens)
        inputs = {k: np.asarray(v) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        items.append(UserItem(f"{path.name}:{i + 1}", inputs, len(piece.encode("utf-8"))))
    return items


def _token_ids(path: Path, bm: Any, max_tokens: int) -> list[UserItem]:
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if not np.issubdtype(arr.dtype, np.integer) or arr.ndim not in (1, 2):
            raise ConfigError(f"{path} must hold integer token ids, shape (N, T) or (T,); got {arr.dtype} {arr.shape}")
        rows = [arr] if arr.ndim == 1 else list(arr)
    else:
        rows = [np.array([int(t) for t in line.split()], dtype=np.int64) for line in path.read_text().splitlines() if line.split()]
    vocab = int(bm.arch.config.get("vocab_size", 0)) or None
    width = 2 if vocab is not None and vocab <= 65536 else 4
    items = []
    for i, row in enumerate(rows):
        ids = np.asarray(row, dtype=np.int64)[:max_tokens]
        if ids.size < 2:
            continue
        if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
            raise ConfigError(f"{path} row {i}: token ids must be in 0..{vocab - 1} for {bm.name}")
        inputs = {"input_ids": ids[None]}
        if bm.kind == "encoder":
            inputs["attention_mask"] = np.ones_like(ids)[None]
        items.append(UserItem(f"{path.name}:{i + 1}", inputs, int(ids.size) * width))
    return items
