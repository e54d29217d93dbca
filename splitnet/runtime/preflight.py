"""Checks a stage launch makes before any model is loaded or process started.

Each raises :class:`splitnet.errors.ConfigError` with the fix in its message: a port that is taken,
a codec name nobody knows, blocks the model does not have. They are cheap (a socket bind, a registry
lookup, one config.json read), so ``serve-stage``, ``serve --plan`` and ``demo`` run them first
instead of failing after seconds of weight loading or in a restart loop.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from splitnet.errors import ConfigError


def check_port_free(bind: str, what: str = "this stage") -> None:
    """Refuse ``bind`` (``tcp://HOST:PORT``) when another socket already holds the port.

    Binds a plain TCP socket with SO_REUSEADDR (as libzmq does, so a port in TIME_WAIT is not
    reported) and closes it at once; port 0 (any free port) and non-tcp endpoints pass."""
    if not bind.startswith("tcp://"):
        return
    host, _, port_text = bind[len("tcp://"):].rpartition(":")
    if not port_text.isdigit() or int(port_text) == 0:
        return
    port = int(port_text)
    host = host.strip("[]")
    if host in ("*", ""):
        host = "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use (by another splitnet stage?); stop that process "
                                  f"or give {what} another port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"cannot bind {bind} for {what}: {host} is not an address of this machine "
                                  "(use 0.0.0.0 to bind every interface)") from None
            if e.errno == errno.EACCES:
                raise ConfigError(f"port {port} on {host} needs privileges to bind; use a port above 1023") from None
            raise ConfigError(f"cannot bind {bind} for {what}: {e.strerror}") from None


def check_codec_spec(spec: str, option: str) -> None:
    """Refuse a codec that is neither a registry name nor a saved codec file, listing the known names.

    A fitted codec (vq, alignedvq, ...) given by name is refused too: it needs its calibrated file."""
    if not spec:
        return
    from splitnet.errors import CodecError
    from splitnet.runtime.cut_codec import load_codec_spec

    try:
        load_codec_spec(spec)
    except CodecError as e:
        raise ConfigError(f"{option} {spec}: {e}") from None
    except ValueError as e:  # the registry's unknown-name error lists the known ones
        hint = "" if Path(spec).suffix == "" else f" (no file {spec} exists either)"
        raise ConfigError(f"{option}: {e}, or a codec file saved by `splitnet calibrate`{hint}") from None


def model_block_count(model: str) -> int:
    """How many blocks ``model`` (built-in name or Hugging Face directory) has, from its config.json."""
    from splitnet.model.loading import architecture_for, resolve_model_dir
    from splitnet.model.weights import read_config

    return architecture_for(read_config(resolve_model_dir(model))).num_blocks


def check_blocks_in_model(model: str, start: int, end: int, what: str = "this stage") -> int:
    """Refuse blocks [start, end) that the model does not have; returns the model's block count."""
    n = model_block_count(model)
    if not 0 <= start < end <= n:
        raise ConfigError(f"{what} asks for blocks {start}:{end}, but model {model} has {n} blocks (0..{n - 1}); "
                          f"a stage serves START:END with 0 <= START < END <= {n}")
    return n
