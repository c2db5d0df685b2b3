"""How much of the full-vocabulary KL divergence the top-K reference keeps, for several K (docs/kld.md).

Both models are loaded; for the first windows of the text the full KL(P_fp16 || P_artifact) is computed from the
two log-softmaxes and next to it the top-K form llmopt stores (FP16's K most likely tokens + the rest's mass).

  python benchmarks/kld_topk_gap.py --model SmolLM2 --text eval.txt ARTIFACT [ARTIFACT ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("artifacts", nargs="+", type=Path, help="transformers-loadable artifact folders")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from llmopt.evaluate.perplexity import make_windows
    from llmopt.runners import load_runner
    from llmopt.runners.hf import HFRunner

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(args.text.read_text(), add_special_tokens=False)["input_ids"][: args.max_tokens]
    windows = make_windows(ids, args.context, args.context)
    base = HFRunner(args.model, "cpu")
    p = torch.cat([base._log_probs([w.ids])[0][0, max(w.score_from, 1) - 1 :] for w in windows])
    base.close()
    for art in args.artifacts:
        runner = load_runner("hf", art, "cpu")
        q = torch.cat([runner._log_probs([w.ids])[0][0, max(w.score_from, 1) - 1 :] for w in windows])
        runner.close()
        full = (p.exp() * (p - q)).sum(-1).double().mean()
        out = [f"{art.name}: {len(p)} tokens, full KL {full:.5f}"]
        for k in (256, 1024, 4096, 16384):
            lp, top = p.topk(k, -1)
            rest = p.scatter(-1, top, float("-inf")).logsumexp(-1)
            q_top, q_rest = q.gather(-1, top), q.scatter(-1, top, float("-inf")).logsumexp(-1)
            kl = ((lp.exp() * (lp - q_top)).sum(-1) + rest.exp() * (rest - q_rest)).double().mean()
            out.append(f"K={k}: {kl:.5f} ({100 * (1 - kl / full):.2f}% low; FP16 mass outside {rest.exp().mean():.4f})")
        print("; ".join(out), flush=True)


if __name__ == "__main__":
    main()
