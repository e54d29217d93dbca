"""Save and load fitted codecs: safetensors for arrays + a small JSON manifest, never pickle.

A codec file ``name.codec`` is a directory-less pair::

    <path>            safetensors file with the codec's arrays
    <path>.json       {"format": 1, "codec": name, "config": {...}, "sha256": "...", "codebook_hash": "..."}

The sha256 covers the config (canonical JSON) and every array (name, dtype, shape, bytes). The
short ``codebook_hash`` (its first 16 hex digits) rides in every payload so the receiver can refuse
features made with another codebook (see :func:`splitnet.codecs.framing.check_hash`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from splitnet.errors import CodecError

FORMAT_VERSION = 1
SHORT_HASH_HEX = 16


def content_hash(arrays: Mapping[str, np.ndarray], config: Mapping[str, Any], name: str = "") -> str:
    """sha256 (hex) over the codec name, its config as canonical JSON and its arrays."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"|{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def manifest_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.with_name(p.name + ".json")


def save_codec(codec, path: str | os.PathLike) -> Path:
    """Write ``codec`` to ``path`` (safetensors) and ``path.json`` (manifest); returns the manifest path."""
    from safetensors.numpy import save_file

    if codec.needs_fit and not getattr(codec, "fitted", True):
        raise CodecError(f"codec {codec.name!r} is not fitted; call fit() before save_codec()")
    arrays, config = codec.state()
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    digest = content_hash(arrays, config, codec.name)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(p), metadata={"codec": codec.name, "sha256": digest})
    manifest = {
        "format": FORMAT_VERSION,
        "codec": codec.name,
        "config": config,
        "sha256": digest,
        "codebook_hash": codec.codebook_hash,
        "arrays": {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in arrays.items()},
    }
    mp = manifest_path(p)
    mp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return mp


def load_codec(path: str | os.PathLike, expected_hash: str | None = None):
    """Load a codec saved by :func:`save_codec`, verifying its sha256.

    ``expected_hash`` (full sha256 or the short codebook hash, e.g. from a plan) is checked too.
    Raises CodecError on a missing, tampered or mismatching file.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from splitnet.codecs.registry import codec_class

    p = Path(path)
    mp = manifest_path(p)
    if not p.is_file() or not mp.is_file():
        raise CodecError(f"codec file {p} or its manifest {mp.name} is missing; run `splitnet calibrate` to create it")
    try:
        manifest = json.loads(mp.read_text())
    except (OSError, ValueError) as e:
        raise CodecError(f"codec manifest {mp} is not valid JSON ({e}); re-run `splitnet calibrate`") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CodecError(f"codec manifest {mp} has an unsupported format {manifest.get('format')!r} (want {FORMAT_VERSION})")
    name, config, digest = manifest.get("codec"), manifest.get("config"), manifest.get("sha256")
    if not isinstance(name, str) or not isinstance(config, dict) or not isinstance(digest, str):
        raise CodecError(f"codec manifest {mp} lacks codec/config/sha256")
    try:
        arrays = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CodecError(f"codec file {p} is not a readable safetensors file ({e}); re-run `splitnet calibrate`") from e
    actual = content_hash(arrays, config, name)
    if actual != digest:
        raise CodecError(
            f"codec file {p} does not match its manifest (sha256 {actual[:12]} != {digest[:12]}): the file was "
            "modified or the pair is mixed up; copy both files again from the machine that ran `splitnet calibrate`"
        )
    if expected_hash and not digest.startswith(expected_hash):
        raise CodecError(
            f"codec file {p} has hash {digest[:SHORT_HASH_HEX]} but {expected_hash[:SHORT_HASH_HEX]} was expected "
            "(plan and codec file disagree); deploy the codec file named in the plan or re-plan"
        )
    try:
        cls = codec_class(name)
    except ValueError as e:
        raise CodecError(str(e)) from e
    try:
        return cls.from_state(arrays, config)
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"codec file {p} could not be rebuilt as {name!r}: {e}") from e


__all__ = ["content_hash", "save_codec", "load_codec", "manifest_path", "SHORT_HASH_HEX"]
