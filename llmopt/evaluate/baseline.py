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
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # not cached, or a cache folder we may not read: score the baseline
        return None
    if not isinstance(data, dict) or data.get("key") != key or "window_nll" not in data.get("result", {}):
        return None
    return data


_warned = False


def store(key: str, result: dict[str, Any]) -> str | None:
    """Cache a baseline result. A cache that cannot be written costs speed, not correctness: the evaluation
    goes on, and the returned problem (given once per process, None afterwards and on success) is for the
    user to see."""
    global _warned
    path = _path(key)
    try:
        write_json_atomic(path, {"key": key, **result})
    except OSError as exc:
        if _warned:
            return None
        _warned = True
        return (
            f"cannot write the FP16 baseline cache in {path.parent} ({exc.strerror or exc}); going on without "
            "caching, so the baseline is scored again next time (set LLMOPT_CACHE to a writable folder)."
        )
    return None


def load_cached_tasks(key: str) -> dict[str, Any] | None:
    """The FP16 baseline's task scores stored under ``key`` (written by ``store``), or None."""
    path = _path(key)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("tasks"), dict):
        return None
    return data
