"""Reading the small YAML/JSON documents a person writes or edits (fleets, profiles, plans)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from splitnet.errors import ConfigError


def read_document(path: str | Path, what: str) -> Any:
    """Parse ``path`` as JSON when its name ends in .json, else as YAML (safe loader).

    Raises ConfigError naming ``what`` and the file when it cannot be read or parsed."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{what} file {str(p)!r}: {e.strerror or e}") from e
    is_json = p.suffix == ".json"
    try:
        return json.loads(text) if is_json else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{what} file {str(p)!r} is not valid {'JSON' if is_json else 'YAML'}: {e}") from e
