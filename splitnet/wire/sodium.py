"""The few libsodium calls the sealed transport needs, through ctypes.

The library is the one pyzmq's libzmq already links for CURVE (bundled in pyzmq's wheels), or
the system's ``libsodium`` when pyzmq was built against a system libzmq. ctypes releases the GIL
for the duration of each call, so sealing in one thread does not stall the others.

Primitives: X25519 (``crypto_scalarmult``), AEGIS-256 (``crypto_aead_aegis256_*``, libsodium
>= 1.0.19: an AES-round AEAD with a 256-bit key, 256-bit nonce and 256-bit tag; about 9 GB/s per
core with AES-NI, against ~1.4 GB/s for the XSalsa20-Poly1305 that CurveZMQ uses).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
from functools import lru_cache

import numpy as np

from splitnet.errors import ConfigError

KEY_BYTES = 32


def new_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array for sealed/opened frames. Backed by a bytearray (calloc), not
    ``np.empty``: numpy asks for transparent huge pages on large arrays, and first-touch faults
    on fresh huge pages (with compaction) measured 3-5 ms per 4 MiB here, against ~1 ms."""
    return np.frombuffer(bytearray(nbytes), np.uint8)


class _Sodium:
    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        if lib.sodium_init() < 0:
            raise ConfigError(f"libsodium at {path} failed to initialise")
        lib.sodium_version_string.restype = ctypes.c_char_p
        self.version = lib.sodium_version_string().decode()
        for name in ("crypto_aead_aegis256_encrypt", "crypto_aead_aegis256_decrypt", "crypto_scalarmult", "crypto_scalarmult_base"):
            if not hasattr(lib, name):
                raise ConfigError(
                    f"libsodium {self.version} at {path} lacks {name} (AEGIS-256 needs libsodium >= 1.0.19); "
                    "upgrade pyzmq (its wheels bundle a recent libsodium) or use --transport curve-zmq"
                )
        u64, p = ctypes.c_ulonglong, ctypes.c_void_p
        self._enc = lib.crypto_aead_aegis256_encrypt
        self._enc.argtypes = [p, ctypes.POINTER(u64), p, u64, p, u64, p, p, p]
        self._dec = lib.crypto_aead_aegis256_decrypt
        self._dec.argtypes = [p, ctypes.POINTER(u64), p, p, u64, p, u64, p, p]
        self._mult = lib.crypto_scalarmult
        self._mult.argtypes = [p, p, p]
        self._mult_base = lib.crypto_scalarmult_base
        self._mult_base.argtypes = [p, p]
        # small frames: the same functions called with the GIL held (PyDLL); dropping and
        # re-taking the GIL costs more than sealing a header (measured ~20 us a round trip)
        held = ctypes.PyDLL(path)
        self._enc_small = held.crypto_aead_aegis256_encrypt
        self._enc_small.argtypes = self._enc.argtypes
        self._dec_small = held.crypto_aead_aegis256_decrypt
        self._dec_small.argtypes = self._dec.argtypes
        lib.crypto_aead_aegis256_abytes.restype = ctypes.c_size_t
        lib.crypto_aead_aegis256_npubbytes.restype = ctypes.c_size_t
        self.tag_bytes = int(lib.crypto_aead_aegis256_abytes())
        self.nonce_bytes = int(lib.crypto_aead_aegis256_npubbytes())
        self._local = threading.local()

    # -- X25519 -----------------------------------------------------------------------------
    def x25519(self, secret: bytes, public: bytes) -> bytes:
        """The shared secret of ``secret`` and ``public``; refuses low-order public keys."""
        if len(secret) != KEY_BYTES or len(public) != KEY_BYTES:
            raise ValueError("X25519 keys are 32 bytes")
        out = ctypes.create_string_buffer(KEY_BYTES)
        if self._mult(out, secret, public) != 0:
            raise ValueError("X25519 with a low-order public key")
        return out.raw

    def x25519_public(self, secret: bytes) -> bytes:
        out = ctypes.create_string_buffer(KEY_BYTES)
        self._mult_base(out, secret)
        return out.raw

    # -- AEGIS-256 ---------------------------------------------------------------------------
    def seal(self, plain: np.ndarray, ad: bytes, nonce: bytes, key: bytes, out: np.ndarray | None = None) -> np.ndarray:
        """``plain`` (uint8, contiguous) encrypted and tagged into ``out`` (len + tag_bytes; a new
        array when None)."""
        if out is None:
            out = new_buffer(plain.nbytes + self.tag_bytes)
        n = ctypes.c_ulonglong()
        rc = self._enc(out.ctypes.data, ctypes.byref(n), plain.ctypes.data, plain.nbytes, ad, len(ad), None, nonce, key)
        if rc != 0 or n.value != out.nbytes:
            raise RuntimeError("crypto_aead_aegis256_encrypt failed")
        return out

    def seal_bytes(self, plain: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes:
        """:meth:`seal` for small frames, bytes in and out (no numpy: ~3x less call overhead)."""
        out = ctypes.create_string_buffer(len(plain) + self.tag_bytes)
        n = ctypes.c_ulonglong()
        if self._enc_small(out, ctypes.byref(n), plain, len(plain), ad, len(ad), None, nonce, key) != 0:
            raise RuntimeError("crypto_aead_aegis256_encrypt failed")
        return out.raw

    def open_bytes(self, sealed: bytes, ad: bytes, nonce: bytes, key: bytes) -> bytes | None:
        """:meth:`open` for small frames, bytes in and out."""
        if len(sealed) < self.tag_bytes:
            return None
        out = ctypes.create_string_buffer(max(1, len(sealed) - self.tag_bytes))
        n = ctypes.c_ulonglong()
        if self._dec_small(out, ctypes.byref(n), None, sealed, len(sealed), ad, len(ad), nonce, key) != 0:
            return None
        return out.raw[: n.value]

    def open(self, sealed: np.ndarray, ad: bytes, nonce: bytes, key: bytes, out: np.ndarray | None = None) -> np.ndarray | None:
        """The plaintext of ``sealed`` (into ``out`` when given), or None when the tag does not verify."""
        if sealed.nbytes < self.tag_bytes:
            return None
        if out is None:
            out = np.empty(sealed.nbytes - self.tag_bytes, np.uint8)
        n = ctypes.c_ulonglong()
        rc = self._dec(out.ctypes.data, ctypes.byref(n), None, sealed.ctypes.data, sealed.nbytes, ad, len(ad), nonce, key)
        return out if rc == 0 else None


def _candidates() -> list[str]:
    import zmq

    here = os.path.dirname(os.path.abspath(zmq.__file__))
    found = sorted(glob.glob(os.path.join(os.path.dirname(here), "pyzmq.libs", "libsodium*")))  # manylinux wheels
    found += sorted(glob.glob(os.path.join(here, ".dylibs", "libsodium*")))  # macOS wheels
    system = ctypes.util.find_library("sodium")
    if system:
        found.append(system)
    env = os.environ.get("SPLITNET_LIBSODIUM")
    return ([env] if env else []) + found


@lru_cache(maxsize=1)
def sodium() -> _Sodium:
    """The loaded library (the first candidate that has AEGIS-256)."""
    errors = []
    for path in _candidates():
        try:
            return _Sodium(ctypes.CDLL(path), path)
        except (OSError, ConfigError) as e:
            errors.append(f"{path}: {e}")
    raise ConfigError(
        "no libsodium with AEGIS-256 found (tried: " + ("; ".join(errors) or "nothing") + "); install pyzmq >= 26 "
        "from a wheel, set SPLITNET_LIBSODIUM=/path/to/libsodium.so (>= 1.0.19), or use --transport curve-zmq"
    )
