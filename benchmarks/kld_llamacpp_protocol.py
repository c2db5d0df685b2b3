"""llmopt's KL divergence on exactly llama-perplexity's tokens and scored positions (docs/kld.md).

`llama-perplexity --kl-divergence-base FILE` stores the token ids it scored (its own tokenization of the text)
in FILE. This script reads them, cuts them into llama-perplexity's chunks (n_ctx tokens each, only the second
half scored: positions n_ctx/2 .. n_ctx-2 predict the next token) and scores them with llmopt's machinery:
the transformers FP16 baseline writes the top-K reference, each GGUF is scored against it through llmopt's
llama.cpp runner. What differs from llama-perplexity's numbers is then only the FP16 side (transformers in
float32 vs llama.cpp's f16 GGUF) and how that side is stored (top-256 + rest in float32 vs uint16 over
[max-16, max] with terms below -16 dropped), not the protocol.

  python benchmarks/kld_llamacpp_protocol.py --base-kld base.kld --model SmolLM2 --gguf q8_0=path.gguf ...
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def read_tokens(path: Path) -> tuple[int, int, list[list[int]]]:
    """(n_ctx, n_vocab, chunks of token ids) from llama-perplexity's --kl-divergence-base file."""
    with open(path, "rb") as f:
        if f.read(8) != b"_logits_":
            raise SystemExit(f"{path} is not a llama-perplexity logits file")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", f.read(12))
        flat = struct.unpack(f"<{n_ctx * n_chunk}i", f.read(4 * n_ctx * n_chunk))
    return n_ctx, n_vocab, [list(flat[i * n_ctx : (i + 1) * n_ctx]) for i in range(n_chunk)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-kld", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="the FP16 transformers folder")
    parser.add_argument("--gguf", action="append", default=[], help="NAME=FILE (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from llmopt.evaluate import kld
    from llmopt.evaluate.perplexity import Window, paired_delta
    from llmopt.runners.hf import HFRunner
    from llmopt.runners.llamacpp import LlamaCppRunner

    n_ctx, n_vocab, chunks = read_tokens(args.base_kld)
    first = n_ctx // 2  # llama-perplexity: logits of positions first .. n_ctx-2 are scored
    windows = [Window(ids, first + 1) for ids in chunks]
    tokens = [len(w.ids) - w.score_from for w in windows]
    base = HFRunner(args.model, "cpu")
    kld.check_vocab(base.n_vocab, n_vocab)
    writer = kld.ReferenceWriter(Path(tempfile.mkdtemp(prefix="kld-proto-")) / "ref", "proto", tokens, base.n_vocab)
    base_ppl, ref = kld.build_reference(windows, base.kld_reference, base.n_vocab, writer)
    base.close()
    out: dict[str, Any] = {
        "n_ctx": n_ctx,
        "chunks": len(chunks),
        "tokens_scored": sum(tokens),
        "baseline_perplexity": base_ppl.perplexity,
        "variants": {},
    }
    for spec in args.gguf:
        name, _, path = spec.partition("=")
        runner = LlamaCppRunner(Path(path), "cpu")
        ppl, dist = kld.score_against(windows, runner.kld_compare, ref)
        runner.close()
        delta, _ = paired_delta(ppl.window_nll, base_ppl.window_nll, tokens)
        out["variants"][name] = {
            "perplexity": ppl.perplexity,
            "ppl_ratio": math.exp(ppl.mean_nll - base_ppl.mean_nll),
            "delta_pct": delta,
            **{k: v for k, v in dist.items() if not k.startswith("window_")},
        }
        print(name, json.dumps(out["variants"][name]), flush=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
