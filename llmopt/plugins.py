"""Registries of named ``"module:attr"`` targets: built-in ones, plus those other packages add by entry point.

Backends (group ``llmopt.backends``) and runners (group ``llmopt.runners``) are found the same way. Nothing is
imported until a target is asked for; a broken distribution never breaks the listing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any


def registered(group: str, builtin: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Name -> (target, origin) for ``builtin`` and the entry points of ``group``; origin is "builtin" or the
    distribution that registered the name. A built-in name cannot be taken over by a plugin."""
    found = {name: (target, "builtin") for name, target in builtin.items()}
    try:
        eps = importlib.metadata.entry_points(group=group)
    except Exception:  # a broken distribution must not break the CLI
        eps = ()  # type: ignore[assignment]
    for ep in eps:
        if ep.name not in found:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "entry point"
            found[ep.name] = (ep.value, dist)
    return found


def load_target(target: str, base: type) -> Any:
    """The class ``target`` ("module:attr") names, which must be a subclass of ``base``."""
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{target} is not a llmopt {base.__name__} subclass")
    return cls
