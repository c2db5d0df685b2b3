"""How far an artifact's next-token distribution moves from FP16's: KL divergence, top-1 agreement, Δp.

Per scored token t (the same token ids and windows as perplexity, evaluate/perplexity.py):

- ``KL(P_fp16 || P_artifact)`` in nats;
- top-1 agreement: FP16's most likely next token is also (one of) the artifact's most likely;
- Δp: the artifact's probability of the actual next token minus FP16's.

Design (bounded memory and disk for an 8B model on a long text):

The FP16 side is computed once per baseline cache key (like the baseline's perplexity) into a *reference* on
disk, next to the baseline cache: for every scored token FP16's ``TOP_K`` most likely ids with their
log-probabilities (float32), the log of the probability mass of all other tokens, and the NLL of the actual
token. That is ``TOP_K * 8 + 12`` bytes per token whatever the vocabulary (2 KiB at the default 256: 21 MB
for SmolLM2 on 10k tokens, 200 MB for 100k tokens of any model), where the full float16 log-probs that
llama.cpp keeps (as uint16) would take ``2 * vocab`` bytes per token (250 KiB for a 128k vocabulary: 25 GB for
100k tokens). The arrays are ``.npy`` files written and read memory-mapped, one batch of windows at a time:
no step ever holds tokens x vocab values in memory, only one batch's logits, as perplexity already does.

The KL divergence is then computed over the partition {each of FP16's top-K tokens, everything else}:

    KL_K = sum_{i in top-K} p_i (log p_i - log q_i) + P_rest (log P_rest - log Q_rest)

This is the KL divergence of the coarse-grained distributions, so (log-sum inequality) it never exceeds the
full one: ``0 <= KL - KL_K = P_rest * KL(P|rest || Q|rest)``, the tail mass times the divergence inside the
tail. On SmolLM2-135M, whose next-token distributions leave 6% of their mass outside the top 256 on average,
KL_256 is 8% below the full KL (3% at K = 1024, 0.7% at 4096; docs/kld.md). FP16 against itself gives exactly 0
(identical operations on identical logits).

Errors: the mean KLD's and the top-1 agreement's standard errors come from the spread of per-window means
(tokens inside a window are correlated), as perplexity's do; the per-window means are stored, so a stored
evaluation's mean and agreement can be recomputed (evaluate/gate.py). The percentiles need every token's
value, which is not stored: they are trusted as recorded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.atomic import sweep_dead_writers
from llmopt.errors import InputError, NoSpaceError

TOP_K = 256
REFERENCE_VERSION = 1
BYTES_PER_TOKEN_EXTRA = 4 + 8  # rest log-mass (float32) + NLL of the actual token (float64)
_ARRAYS = ("top_ids", "top_lp", "rest_lp", "nll")


class VocabularyMismatchError(InputError):
    """The baseline's and the artifact's output layers cover different vocabularies."""


def reference_bytes(tokens: int, k: int = TOP_K) -> int:
    """Disk size of a reference for ``tokens`` scored tokens (the .npy headers aside)."""
    return tokens * (k * 8 + BYTES_PER_TOKEN_EXTRA)


# --- the per-token arithmetic, once in torch (transformers runners), once in numpy (llama.cpp) ----------


def reference_rows_torch(logp: Any, targets: Any, k: int) -> tuple[Any, ...]:
    """FP16's reference for rows of log-probs ``logp`` [n, V] (float32) and the actual next tokens [n].

    Returns numpy arrays: top ids [n, k] int32, top log-probs [n, k] float32 (descending), the log of the
    remaining mass [n] float32, NLL of the actual token [n] float64.
    """
    import torch

    k = min(k, logp.shape[-1])
    top_lp, top_ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1) if k < logp.shape[-1] else None
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if rest is None:
        rest = torch.full(nll.shape, float("-inf"), device=logp.device)
    return (
        top_ids.to(torch.int32).cpu().numpy(),
        top_lp.cpu().numpy(),
        rest.cpu().numpy(),
        nll.double().cpu().numpy(),
    )


def compare_rows_torch(logp: Any, targets: Any, ref: Sequence[Any]) -> tuple[Any, Any, Any]:
    """Per-token (KL_K, top-1 agreement, artifact NLL) of the artifact's log-probs ``logp`` [n, V] against
    the reference rows ``ref`` = (top ids, top log-probs, rest log-mass) for the same n tokens (numpy)."""
    import torch

    ids = torch.as_tensor(ref[0], device=logp.device).long()
    p_lp = torch.as_tensor(ref[1], device=logp.device).double()
    p_rest = torch.as_tensor(ref[2], device=logp.device).double()
    q_top = logp.gather(-1, ids).double()
    if ids.shape[-1] < logp.shape[-1]:
        q_rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1).double()
    else:
        q_rest = torch.full(p_rest.shape, float("-inf"), dtype=torch.float64, device=logp.device)
    kl = (p_lp.exp() * (p_lp - q_top)).sum(-1)
    # No tail mass on FP16's side means no tail term (0 * log 0 = 0), whatever the artifact puts there.
    tail = torch.where(torch.isfinite(p_rest), p_rest.exp() * (p_rest - q_rest), torch.zeros_like(p_rest))
    kl = kl + tail
    # Agreement by value, not index: a tie for the top counts as agreeing (argmax picks one arbitrarily).
    agree = q_top[:, 0] >= logp.max(-1).values.double()
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    return kl.cpu().numpy(), agree.cpu().numpy(), nll.cpu().numpy()


def _log_softmax_np(logits: Any) -> Any:
    import numpy as np

    rows = logits.astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(rows - peak).sum(axis=1, keepdims=True)) + peak
    return rows - lse


def _logsumexp_np(rows: Any) -> Any:
    import numpy as np

    peak = rows.max(axis=1, keepdims=True)
    finite = np.isfinite(peak[:, 0])
    safe = np.where(np.isfinite(peak), peak, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(rows - safe).sum(axis=1)) + safe[:, 0]
    return np.where(finite, out, -np.inf)


def compare_rows_numpy(logits: Any, targets: Any, ref: Sequence[Any], chunk: int = 64) -> tuple[Any, Any, Any]:
    """``compare_rows_torch`` for raw logits [n, V] in numpy (llama.cpp's worker), float64, ``chunk`` rows at a
    time so that no more than chunk x V float64 values are held."""
    import numpy as np

    n = len(targets)
    kl = np.empty(n, dtype=np.float64)
    agree = np.empty(n, dtype=bool)
    nll = np.empty(n, dtype=np.float64)
    ids_all, lp_all, rest_all = (np.asarray(a) for a in ref[:3])
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        q = _log_softmax_np(logits[lo:hi])
        ids = ids_all[lo:hi].astype(np.int64)
        p_lp = lp_all[lo:hi].astype(np.float64)
        p_rest = rest_all[lo:hi].astype(np.float64)
        q_top = np.take_along_axis(q, ids, axis=1)
        if ids.shape[1] < q.shape[1]:
            masked = q.copy()
            np.put_along_axis(masked, ids, -np.inf, axis=1)
            q_rest = _logsumexp_np(masked)
        else:
            q_rest = np.full(hi - lo, -np.inf)
        with np.errstate(invalid="ignore"):
            tail = np.where(np.isfinite(p_rest), np.exp(p_rest) * (p_rest - q_rest), 0.0)
        kl[lo:hi] = (np.exp(p_lp) * (p_lp - q_top)).sum(axis=1) + tail
        agree[lo:hi] = q_top[:, 0] >= q.max(axis=1)
        nll[lo:hi] = -q[np.arange(hi - lo), np.asarray(targets[lo:hi], dtype=np.int64)]
    return kl, agree, nll


# --- the reference on disk ----------------------------------------------------------------------------


@dataclass
class Reference:
    """FP16's top-K log-probs of every scored token, memory-mapped (read-only)."""

    path: Path
    k: int
    vocab: int
    tokens: int
    offsets: list[int]  # start row of each window (and the total at the end)

    def window(self, index: int) -> tuple[Any, Any, Any, Any]:
        import numpy as np

        lo, hi = self.offsets[index], self.offsets[index + 1]
        arrays = [np.load(self.path / f"{name}.npy", mmap_mode="r") for name in _ARRAYS]
        return tuple(np.array(a[lo:hi]) for a in arrays)  # type: ignore[return-value]

    def nll(self) -> Any:
        import numpy as np

        return np.asarray(np.load(self.path / "nll.npy", mmap_mode="r"))


def reference_path(key: str, k: int = TOP_K) -> Path:
    from llmopt.source import cache_dir

    return cache_dir() / "baselines" / f"{key}.kld-top{k}"


def load_reference(path: Path, window_tokens: list[int], key: str) -> Reference | None:
    """The reference at ``path`` if it is complete and made for these windows (else None: score again)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(meta, dict)
        or meta.get("version") != REFERENCE_VERSION
        or meta.get("key") != key
        or meta.get("window_tokens") != window_tokens
    ):
        return None
    for name in _ARRAYS:
        if not (path / f"{name}.npy").is_file():
            return None
    return Reference(path, int(meta["k"]), int(meta["vocab"]), int(meta["tokens"]), _offsets(window_tokens))


def _offsets(window_tokens: list[int]) -> list[int]:
    out = [0]
    for n in window_tokens:
        out.append(out[-1] + n)
    return out


def check_space(folder: Path, needed: int) -> None:
    """Refuse (exit 4) before scoring when ``folder``'s disk cannot take ``needed`` bytes (+5% and 64 MiB)."""
    from llmopt.units import fmt_bytes

    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < needed * 1.05 + 64 * 2**20:
        raise NoSpaceError(
            f"the FP16 reference for the KL divergence needs {fmt_bytes(needed)} in {folder}, and "
            f"{fmt_bytes(free)} is free there.",
            "Free some space, point LLMOPT_CACHE at a disk with room, lower --max-tokens, or pass --no-kld.",
        )


def _sweep_dead_partials(final: Path) -> None:
    """Remove ``.NAME.partial-PID-*`` staging folders of ``final`` whose process is gone (killed mid-write)."""
    prefix = f".{final.name}.partial-"
    sweep_dead_writers(final.parent, f"{prefix}*-*", lambda name: name[len(prefix) :].split("-", 1)[0])


class ReferenceWriter:
    """Writes a reference window by window into a staging folder; ``finish`` moves it into place."""

    def __init__(self, final: Path, key: str, window_tokens: list[int], vocab: int, k: int = TOP_K) -> None:
        from numpy.lib.format import open_memmap

        self.final, self.key, self.window_tokens, self.vocab = final, key, window_tokens, vocab
        self.k = min(k, vocab)
        self.tokens = sum(window_tokens)
        self.offsets = _offsets(window_tokens)
        check_space(final.parent, reference_bytes(self.tokens, self.k))
        final.parent.mkdir(parents=True, exist_ok=True)
        _sweep_dead_partials(final)
        # the PID in the name: a folder left by a killed process is found and removed by the next writer
        self.staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
        shapes = {
            "top_ids": ((self.tokens, self.k), "int32"),
            "top_lp": ((self.tokens, self.k), "float32"),
            "rest_lp": ((self.tokens,), "float32"),
            "nll": ((self.tokens,), "float64"),
        }
        self.arrays = {
            name: open_memmap(self.staging / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            for name, (shape, dtype) in shapes.items()
        }

    def put(self, index: int, rows: Sequence[Any]) -> None:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        for name, values in zip(_ARRAYS, rows, strict=True):
            if len(values) != hi - lo:
                raise RuntimeError(f"reference rows for window {index}: {len(values)}, expected {hi - lo}")
            self.arrays[name][lo:hi] = values

    def finish(self) -> Reference:
        for arr in self.arrays.values():
            arr.flush()
        self.arrays.clear()
        meta = {
            "version": REFERENCE_VERSION,
            "key": self.key,
            "k": self.k,
            "vocab": self.vocab,
            "tokens": self.tokens,
            "window_tokens": self.window_tokens,
        }
        (self.staging / "meta.json").write_text(json.dumps(meta))  # written last: marks the folder complete
        if self.final.exists():
            shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.staging, self.final)
        return Reference(self.final, self.k, self.vocab, self.tokens, self.offsets)

    def abort(self) -> None:
        self.arrays.clear()
        shutil.rmtree(self.staging, ignore_errors=True)


@contextmanager
def reference_folder(key: str, use_cache: bool) -> Iterator[Path]:
    """Where the reference lives: the cache (kept for later evaluations), or a temporary folder removed at
    the end when caching is off or the cache folder cannot be written."""
    if use_cache:
        path = reference_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            usable = os.access(path.parent, os.W_OK | os.X_OK)
        except OSError:
            usable = False
        # the yield stays outside the try: an OSError of the evaluation inside the block (weights missing, disk
        # full) was caught here and the generator yielded again, so the run reported "RuntimeError: generator
        # didn't stop after throw()" (exit 1) instead of it
        if usable:
            yield path
            return
    tmp = Path(tempfile.mkdtemp(prefix="llmopt-kld-"))
    try:
        yield tmp / "reference"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- scoring loops -------------------------------------------------------------------------------------


def check_vocab(reference_vocab: int, artifact_vocab: int) -> None:
    if reference_vocab != artifact_vocab:
        raise VocabularyMismatchError(
            f"the FP16 baseline's output layer has {reference_vocab:,} entries and the artifact's "
            f"{artifact_vocab:,}: KL divergence compares two distributions over one vocabulary, so it is not "
            "defined here.",
            "Evaluate against the model the artifact was made from, or pass --no-kld for perplexity alone.",
        )


RefFn = Callable[[list[list[int]], list[int], int], list[tuple[Any, ...]]]
CompareFn = Callable[[list[list[int]], list[int], list[tuple[Any, ...]]], list[tuple[Any, Any, Any]]]


def build_reference(
    windows: list[Any],
    reference_fn: RefFn,
    vocab: int,
    writer: ReferenceWriter,
    *,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Any, Reference]:
    """Score the baseline's windows once: its perplexity result and its reference (written by ``writer``)."""
    from llmopt.evaluate.perplexity import aggregate

    window_nll: list[float] = []
    window_tokens: list[int] = []
    total, count = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            batch = windows[i : i + batch_size]
            rows = reference_fn([w.ids for w in batch], [w.score_from for w in batch], writer.k)
            for j, (w, row) in enumerate(zip(batch, rows, strict=True)):
                writer.put(i + j, row)
                s = math.fsum(row[3].tolist())
                total += s
                count += len(row[3])
                window_nll.append(s / len(row[3]))
                window_tokens.append(len(w.ids) - w.score_from)
            if on_batch:
                on_batch(len(batch))
        ref = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return aggregate(window_nll, window_tokens, total, count), ref


def score_against(
    windows: list[Any],
    compare_fn: CompareFn,
    reference: Reference,
    *,
    batch_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Score the artifact's windows against the reference: its perplexity result and the distribution block."""
    import numpy as np

    from llmopt.evaluate.perplexity import aggregate

    kl_parts, agree_parts, nll_parts = [], [], []
    window_nll: list[float] = []
    window_tokens: list[int] = []
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        refs = [reference.window(i + j)[:3] for j in range(len(batch))]
        rows = compare_fn([w.ids for w in batch], [w.score_from for w in batch], refs)
        for w, (kl, agree, nll) in zip(batch, rows, strict=True):
            expected = len(w.ids) - w.score_from
            if len(nll) != expected:
                raise RuntimeError(f"runner returned {len(nll)} values for a window that scores {expected}")
            kl_parts.append(np.asarray(kl, dtype=np.float64))
            agree_parts.append(np.asarray(agree, dtype=bool))
            nll_parts.append(np.asarray(nll, dtype=np.float64))
            s = math.fsum(nll.tolist())
            total += s
            count += len(nll)
            window_nll.append(s / len(nll))
            window_tokens.append(expected)
        if on_batch:
            on_batch(len(batch))
    result = aggregate(window_nll, window_tokens, total, count)
    dist = summarize(
        np.concatenate(kl_parts),
        np.concatenate(agree_parts),
        np.concatenate(nll_parts),
        reference.nll(),
        window_tokens,
        k=reference.k,
    )
    return result, dist


# --- statistics ------------------------------------------------------------------------------------------


def window_means(values: Any, window_tokens: list[int]) -> list[float]:
    out, lo = [], 0
    for n in window_tokens:
        out.append(math.fsum(values[lo : lo + n].tolist()) / n)
        lo += n
    return out


def summarize(
    kl: Any, agree: Any, nll_art: Any, nll_base: Any, window_tokens: list[int], *, k: int = TOP_K
) -> dict[str, Any]:
    """The report's ``distribution`` block from per-token values (numpy arrays of one length)."""
    import numpy as np

    from llmopt.evaluate.perplexity import _stderr_of_mean

    window_kld = window_means(kl, window_tokens)
    window_top1 = window_means(agree.astype(np.float64), window_tokens)
    dp = np.exp(-nll_art) - np.exp(-nll_base)
    count = sum(window_tokens)
    mean_kld = math.fsum(m * n for m, n in zip(window_kld, window_tokens, strict=True)) / count
    top1 = math.fsum(m * n for m, n in zip(window_top1, window_tokens, strict=True)) / count

    def pct(q: float) -> float:
        return float(np.percentile(kl, q))  # linear interpolation, as llmopt.stats.percentile

    return {
        "tokens": int(count),
        "top_k": k,
        "kld_mean": mean_kld,
        "kld_stderr": _stderr_of_mean(window_kld, window_tokens),
        "kld_median": pct(50),
        "kld_p90": pct(90),
        "kld_p99": pct(99),
        "kld_p999": pct(99.9),
        "kld_max": float(kl.max()),
        "top1_agreement": top1,
        "top1_agreement_stderr": _stderr_of_mean(window_top1, window_tokens),
        "delta_p_mean": float(dp.mean()),
        "delta_p_rms": float(np.sqrt(np.mean(dp * dp))),
        "window_kld": window_kld,
        "window_top1": window_top1,
        "method": f"KL(P_fp16 || P_artifact) over FP16's top {k} tokens + the rest's mass (a lower bound of the "
        "full-vocabulary KL); nats per token",
    }
