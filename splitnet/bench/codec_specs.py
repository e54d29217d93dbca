"""Codec settings as the benches take them on the command line: ``NAME[:KEY=VALUE,...]``, with
``/`` or ``,`` between keys, several settings separated by commas (``int8,pq:m=16/nbits=8``)."""

from __future__ import annotations

from typing import Any


def parse_codec_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'pq:m=16,nbits=8' or 'pq:m=16/nbits=8' -> ('pq', {'m': 16, 'nbits': 8})."""
    name, _, rest = spec.partition(":")
    config: dict[str, Any] = {}
    for kv in filter(None, rest.replace("/", ",").split(",")):
        k, sep, v = kv.partition("=")
        if not sep:
            raise ValueError(f"codec setting {spec!r}: {kv!r} is not KEY=VALUE")
        try:
            config[k] = int(v)
        except ValueError:
            try:
                config[k] = float(v)
            except ValueError:
                config[k] = v
    return name.strip(), config


def split_codec_specs(text: str) -> list[str]:
    """The settings of a comma-separated list, keeping the commas inside one setting's KEY=VALUE list."""
    out: list[str] = []
    for part in text.split(","):
        if out and "=" in part and ":" not in part:
            out[-1] += "," + part
        else:
            out.append(part)
    return [p.strip() for p in out if p.strip()]
