"""Small real files and shared checks for tests."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path
from typing import Any

SMOLLM2_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], *, truncate: int = 0) -> None:
    """A valid safetensors file (zeros), optionally missing its last ``truncate`` bytes."""
    widths = {"F16": 2, "F32": 4}
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = widths[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    data = struct.pack("<Q", len(blob)) + blob + b"\0" * offset
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


def fake_model(folder: Path, config: dict[str, Any] | None = None, *, truncate: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or SMOLLM2_CONFIG))
    write_safetensors(folder / "model.safetensors", {"w": ("F16", [64, 64])}, truncate=truncate)
    return folder


def random_models() -> Any:
    """scripts/random_models.py as a module (random-weight Llama models and GPTQ/AWQ checkpoints)."""
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("random_models", root / "scripts" / "random_models.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("random_models", module)
    spec.loader.exec_module(module)
    return module


def dense_matches_the_kernel(artifact: Path) -> None:
    """A GPTQ/AWQ artifact scored dense in float32 on CPU (llmopt's default there) computes what GPTQModel's
    own float16 torch kernel computes, up to that kernel's rounding."""
    import torch

    from llmopt.runners.hf import HFRunner

    ids = torch.arange(100, 164).unsqueeze(0)
    logits = {}
    for kernel in (None, "torch"):
        runner = HFRunner(artifact, "cpu", loader="gptqmodel", kernel=kernel)
        try:
            with torch.no_grad():
                logits[kernel] = runner.model(input_ids=ids).logits.float()
        finally:
            runner.close()
    dense, fp16 = logits[None], logits["torch"]
    # float16 rounding in the kernel's matmul (measured on full SmolLM2: GPTQ 8-bit 1.0e-3, AWQ 1.4e-3)
    assert ((dense - fp16).norm() / fp16.norm()).item() < 5e-3
    assert (dense.argmax(-1) == fp16.argmax(-1)).float().mean().item() > 0.95


def first_layers(model_dir: Path, out: Path, layers: int) -> Path:
    """SmolLM2's own weights cut to its first ``layers`` decoder layers (embeddings, norm and tied head kept):
    the real GPTQ/AWQ paths end to end in CI time; its perplexity means nothing on its own, only next to its FP16."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    keep = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open has keys(), no iteration
            parts = name.split(".")
            if parts[:2] == ["model", "layers"] and int(parts[2]) >= layers:
                continue
            keep[name] = f.get_tensor(name)
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in model_dir.iterdir():
        if extra.name not in ("model.safetensors", "config.json") and extra.is_file():
            shutil.copy(extra, out / extra.name)
    return out


def run_cli(
    args: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 1800,
) -> Any:
    """``llmopt ARGS`` as a user runs it: a real process (its own signal handling, exit code, stdout and
    stderr apart), from ``cwd`` (relative paths resolve there), with the test session's isolated caches.
    Returns the ``subprocess.CompletedProcess`` (``returncode``, ``stdout``, ``stderr`` as text)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    full_env = dict(os.environ)
    # the checkout under test, even when the installed llmopt is an editable install of another one
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), full_env.get("PYTHONPATH", "")) if p)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "llmopt", *args],
        cwd=cwd,
        env=full_env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_in_process(args: list[str], capsys: Any) -> tuple[int, str]:
    """``llmopt ARGS`` in this process: (exit code, stderr)."""
    import pytest

    from llmopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    _, err = capsys.readouterr()
    return (exc.value.code if isinstance(exc.value.code, int) else 1), err


def smollm2_source(tmp_path: Path) -> Any:
    """A SourceModel with SmolLM2's config at ``tmp_path`` (no weights): for option checks."""
    from llmopt.source import SourceModel

    return SourceModel(spec="m", path=tmp_path, config=dict(SMOLLM2_CONFIG))
