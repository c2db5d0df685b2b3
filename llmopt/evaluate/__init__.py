"""Evaluation: perplexity on shared token ids, the cached FP16 baseline, and the gate."""
