"""The GPU catalog: memory, bandwidth and price of known GPUs (llmopt/data/gpus.yaml, plus a file of the
user's own via LLMOPT_GPU_CATALOG)."""

from __future__ import annotations

import difflib
import os
import re
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmopt.errors import InputError

GPU_CATALOG_ENV = "LLMOPT_GPU_CATALOG"


# --------------------------------------------------------------------------------------------
# GPU catalog
# --------------------------------------------------------------------------------------------


class GPUSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    aliases: list[str] = Field(default_factory=list)
    memory_bytes: int = Field(gt=0)
    bandwidth_bytes_per_s: int = Field(gt=0)
    source: str | None = None


class _CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: list[GPUSpec]


def _read_catalog(text: str, origin: str) -> list[GPUSpec]:
    import yaml

    try:
        data = yaml.safe_load(text)
        return _CatalogFile.model_validate(data).gpus
    except yaml.YAMLError as exc:
        raise InputError(f"GPU catalog {origin} is not valid YAML ({exc}).", "Fix the file's syntax.") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InputError(
            f"GPU catalog {origin}: {where}: {first['msg']}.",
            "Each entry needs name, memory_bytes and bandwidth_bytes_per_s (integers); aliases and "
            "source are optional. See llmopt/data/gpus.yaml.",
        ) from None


def load_gpu_catalog(extra: str | Path | None = None) -> dict[str, GPUSpec]:
    """The built-in catalog, then ``$LLMOPT_GPU_CATALOG``, then ``extra``; later entries win."""
    builtin = resources.files("llmopt").joinpath("data/gpus.yaml").read_text()
    specs = _read_catalog(builtin, "llmopt/data/gpus.yaml")
    for path in (os.environ.get(GPU_CATALOG_ENV), extra):
        if not path:
            continue
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"GPU catalog {p} does not exist.", f"Fix --gpu-catalog or ${GPU_CATALOG_ENV}.")
        specs.extend(_read_catalog(p.read_text(), str(p)))
    return {spec.name: spec for spec in specs}


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def find_gpu(name: str, catalog: dict[str, GPUSpec]) -> GPUSpec:
    """Look a GPU up by name or alias (case-insensitive); a miss names the close matches."""
    wanted = _norm(name)
    for spec in catalog.values():
        if wanted == _norm(spec.name) or wanted in {_norm(a) for a in spec.aliases}:
            return spec
    names = {_norm(s.name): s.name for s in catalog.values()}
    for s in catalog.values():
        names.update({_norm(a): s.name for a in s.aliases})
    close = list(dict.fromkeys(names[c] for c in difflib.get_close_matches(wanted, names, n=3, cutoff=0.5)))
    raise InputError(
        f"unknown GPU '{name}'" + (f" (did you mean {', '.join(close)}?)." if close else "."),
        f"Known: {', '.join(catalog)}. Add one with --gpu-catalog FILE (YAML, like llmopt/data/gpus.yaml).",
    )
