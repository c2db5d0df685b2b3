"""Shared fixtures.

Tests never touch the user's caches: HF_HOME and LLMOPT_CACHE point into a per-session temp folder.
The real assets (SmolLM2-135M as an fp16 folder, Britannica text) are prepared once by
scripts/prepare_assets.py into $LLMOPT_ASSETS (default ~/.cache/llmopt/assets) and reused; that
folder is only read by tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("caches")
    os.environ["LLMOPT_CACHE"] = str(base / "llmopt")
    os.environ["HF_HOME"] = str(base / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")


@pytest.fixture(scope="session")
def assets() -> dict[str, Path]:
    """Paths of the real model and texts; prepared on first use (needs the `core` extra)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("needs torch + transformers (pip install -e '.[all,test]')")
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "prepare_assets.py")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {k: Path(v) for k, v in json.loads(out).items()}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run these on the GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
