"""The FP16 baseline, scored once per (model hash, eval settings, device, library versions) and cached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmopt.artifact import sha256_json, write_json_atomic
from llmopt.source import cache_dir

# Bump when the scoring protocol changes, so old cached numbers are not reused.
PROTOCOL_VERSION = 2


def cache_key(parts: dict[str, Any]) -> str:
    return sha256_json({"protocol": PROTOCOL_VERSION, **parts})


def _path(key: str) -> Path:
    return cache_dir() / "baselines" / f"{key}.json"


def load_cached(key: str) -> dict[str, Any] | None:
    path = _path(key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("key") != key or "window_nll" not in data.get("result", {}):
        return None
    return data


def store(key: str, result: dict[str, Any]) -> None:
    write_json_atomic(_path(key), {"key": key, **result})
