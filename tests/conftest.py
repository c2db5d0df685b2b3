"""Shared fixtures.

Tests never touch the user's caches: HF_HOME and LLMOPT_CACHE point into a per-session temp folder.
The real assets (SmolLM2-135M as an fp16 folder, Britannica text) are prepared once by
scripts/prepare_assets.py into $LLMOPT_ASSETS (default ~/.cache/llmopt/assets) and reused; that
folder is only read by tests.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

# huggingface_hub and transformers read these once, when first imported: set here, at conftest import, before
# any test module (or llmopt) can import them, so in-process tests really are offline and use these caches.
_CACHES = Path(tempfile.mkdtemp(prefix="llmopt-test-caches-"))
atexit.register(shutil.rmtree, _CACHES, True)
os.environ["LLMOPT_CACHE"] = str(_CACHES / "llmopt")
os.environ["HF_HOME"] = str(_CACHES / "hf")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "passive")


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches() -> None:
    """Kept for tests that name it; the environment is set at conftest import (see above)."""
    assert os.environ["HF_HUB_OFFLINE"] == "1"


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


@pytest.fixture(scope="session")
def evaluated_artifact(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One real artifact for the session: SmolLM2-135M quantized to bitsandbytes int8 and evaluated against its
    FP16 on 1,024 tokens of the eval text (4 windows of 256), gated at +5%. Tests copy ``path`` before changing
    anything; ``report`` is the evaluation report as api.evaluate returned it."""
    pytest.importorskip("bitsandbytes")
    from llmopt import api
    from llmopt.evaluate.gate import GateSpec

    root = tmp_path_factory.mktemp("evaluated")
    art = api.quantize(str(assets["model"]), "bnb-int8", root / "smol-int8", device="cpu")
    report = api.evaluate(
        art.path,
        str(assets["model"]),
        str(assets["eval_text"]),
        context_length=256,
        max_tokens=1024,
        device="cpu",
        gate=GateSpec(max_ppl_increase_pct=5.0),
    )
    return {"path": art.path, "report": report, "model": assets["model"], "text": assets["eval_text"]}
