"""Speculative decoding: a (possibly quantized) draft proposes tokens, the target verifies them.

``speculative_bench`` runs transformers' assisted generation (``generate(..., assistant_model=draft)``)
greedily, and the target alone on the same prompts, and reports:

- acceptance: how many of the tokens the draft proposed the target kept. transformers does not
  return this; it passes it, after each verification step, to the candidate generator's
  ``update_candidate_strategy(input_ids, scores, num_matches)`` (``generation/utils.py``,
  ``_assisted_decoding``). We wrap the candidate generator that ``_get_candidate_generator`` builds
  for each call and read ``num_matches`` there, and the draft length from what ``get_candidates``
  returned. ``num_matches`` is what transformers kept, after cutting at EOS or the length limit.
- tokens/s of each mode and the speedup;
- whether the greedy outputs are identical token for token (they should be: with greedy
  verification the target decides every token; a mismatch means numerics differ between the
  batched verification pass and one-token decoding, which fp16 kernels can do on near-ties).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmopt.errors import BackendUnavailableError, InputError
from llmopt.progress import Reporter, SilentReporter

DEFAULT_PROMPTS = (
    "The history of the printing press begins",
    "Write a short explanation of why the sky is blue.",
    "def fibonacci(n):",
)


class PromptRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt_tokens: int
    target_new_tokens: int
    assisted_new_tokens: int
    target_seconds: float
    assisted_seconds: float
    drafted_tokens: int
    accepted_tokens: int
    rounds: int = Field(description="target verification passes in assisted generation.")
    identical: bool
    first_mismatch: int | None = Field(description="index of the first differing new token, or None.")


class SpeculativeResult(BaseModel):
    """Assisted generation with ``draft`` against ``target`` alone, greedy, on the same prompts."""

    model_config = ConfigDict(extra="forbid")
    target: str
    draft: str
    draft_runner: str = Field(description="how the draft was loaded: hf (transformers) or gptqmodel.")
    device: str
    dtype: str
    max_new_tokens: int
    prompts: int
    num_assistant_tokens: int | None = Field(description="largest draft per round (transformers' setting).")
    assistant_confidence_threshold: float | None
    drafted_tokens: int
    accepted_tokens: int
    acceptance_rate: float | None = Field(description="accepted / drafted draft tokens; None if none drafted.")
    rounds: int
    tokens_per_round: float | None = Field(description="new tokens per target pass (accepted + 1 from the target).")
    target_tokens_per_s: float
    assisted_tokens_per_s: float
    speedup: float = Field(description="assisted tokens/s / target-alone tokens/s.")
    identical: bool = Field(description="greedy outputs equal token for token on every prompt.")
    per_prompt: list[PromptRun]
    environment: dict[str, Any]


class _AcceptanceCounter:
    """Counts drafted and accepted tokens by wrapping the candidate generator of one model."""

    def __init__(self) -> None:
        self.drafted = 0
        self.accepted = 0
        self.rounds = 0
        self._had_own: tuple[bool, Any] = (False, None)

    def reset(self) -> None:
        self.drafted = self.accepted = self.rounds = 0

    def install(self, model: Any) -> None:
        build = getattr(model, "_get_candidate_generator", None)
        if build is None:
            import transformers

            raise BackendUnavailableError(
                f"transformers {transformers.__version__} has no candidate-generator hook, so draft "
                "acceptance cannot be counted.",
                "Install the transformers version llmopt supports: pip install 'llmopt[core]'.",
            )
        counter = self
        own = vars(model).get("_get_candidate_generator")
        self._had_own = (own is not None, own)

        def build_counting(*args: Any, **kwargs: Any) -> Any:
            generator = build(*args, **kwargs)
            get_candidates = generator.get_candidates
            update = generator.update_candidate_strategy
            last = {"drafted": 0}

            def counting_get_candidates(input_ids: Any, *a: Any, **k: Any) -> Any:
                candidate_ids, candidate_logits = get_candidates(input_ids, *a, **k)
                last["drafted"] = int(candidate_ids.shape[1] - input_ids.shape[1])
                return candidate_ids, candidate_logits

            def counting_update(input_ids: Any, scores: Any, num_matches: Any) -> Any:
                counter.rounds += 1
                counter.drafted += last["drafted"]
                counter.accepted += int(num_matches)
                last["drafted"] = 0
                return update(input_ids, scores, num_matches)

            generator.get_candidates = counting_get_candidates
            generator.update_candidate_strategy = counting_update
            return generator

        model._get_candidate_generator = build_counting

    def uninstall(self, model: Any) -> None:
        had, own = self._had_own
        if had:
            model._get_candidate_generator = own
        else:
            vars(model).pop("_get_candidate_generator", None)


def _locate(spec: str, role: str) -> tuple[Path, str]:
    """Where a model is and which loader it needs; cheap checks only, so bad input fails before any load."""
    from llmopt.artifact import MANIFEST_NAME, Artifact
    from llmopt.source import resolve

    path = Path(spec).expanduser()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        art = Artifact.open(path)
        kind = art.manifest.runner
        if kind not in ("hf", "gptqmodel"):
            raise InputError(
                f"the {role} {spec} is a {art.manifest.format} artifact run by '{kind}', which transformers' "
                "assisted generation cannot use.",
                "Use a transformers-loadable artifact (gptq, awq, bnb-*) or a model folder.",
            )
        art.require_intact()
        return art.path, kind
    return resolve(spec).path, "hf"


def _load(path: Path, kind: str, device: str) -> Any:
    from llmopt.runners.hf import HFRunner

    return HFRunner(path, device, loader=kind, dense_on_cpu=False)  # timed: through the real kernels


def _check_tokenizers(target_path: Path, draft_path: Path, target_tok: Any) -> None:
    from transformers import AutoTokenizer

    try:
        draft_tok = AutoTokenizer.from_pretrained(draft_path)
    except Exception:
        return  # no tokenizer saved with the draft: trust the vocabulary-size check below
    if draft_tok.get_vocab() != target_tok.get_vocab():
        raise InputError(
            f"the draft ({draft_path}) and the target ({target_path}) have different tokenizers.",
            "Speculative decoding here needs a draft from the same family (same tokenizer), e.g. a smaller "
            "model of the same series or a quantized copy of the target.",
        )


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Assisted generation makes transformers warn about arguments it passes itself to the draft."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _generate(model: Any, ids: Any, mask: Any, max_new_tokens: int, pad_id: int | None, draft: Any = None) -> Any:
    import torch

    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": max_new_tokens,  # the same number of tokens in both modes, EOS or not
        "do_sample": False,
        "pad_token_id": pad_id,
    }
    if draft is not None:
        kwargs["assistant_model"] = draft
    with torch.inference_mode(), _quiet_transformers():
        return model.generate(**kwargs)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def speculative_bench(
    target: str,
    draft: str,
    *,
    prompts: list[str],
    max_new_tokens: int = 64,
    device: str = "auto",
    num_assistant_tokens: int | None = None,
    warmup: bool = True,
    reporter: Reporter | None = None,
) -> SpeculativeResult:
    """Greedy assisted generation of ``target`` with ``draft`` against ``target`` alone.

    ``target`` and ``draft`` are model folders, .gguf files, Hub ids or llmopt artifact folders
    (loaded as their manifest's runner says: gptqmodel -> GPTQModel.load, else transformers).
    Each prompt is generated to exactly ``max_new_tokens`` new tokens (EOS does not stop it) in
    both modes, batch 1 (transformers' assisted generation supports only batch 1).
    ``num_assistant_tokens``: largest draft per round (default: transformers' own, 20, with its
    confidence threshold stopping a draft early).
    """
    from llmopt.environment import environment, resolve_device

    reporter = reporter or SilentReporter()
    if not prompts or not any(p.strip() for p in prompts):
        raise InputError("no prompts to generate from.", "Pass a --prompt-file with one prompt per line.")
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1.", "Pass e.g. --max-new-tokens 64.")
    if num_assistant_tokens is not None and num_assistant_tokens < 1:
        raise InputError("--num-assistant-tokens must be at least 1.", "Pass e.g. --num-assistant-tokens 5.")
    dev = resolve_device(device)

    from transformers import AutoTokenizer

    target_path, target_kind = _locate(target, "target")
    draft_path, draft_kind = _locate(draft, "draft")
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    _check_tokenizers(target_path, draft_path, tokenizer)
    with reporter.step(f"loading target {target}"):
        target_runner = _load(target_path, target_kind, dev)
    draft_runner = None
    try:
        with reporter.step(f"loading draft {draft}"):
            draft_runner = _load(draft_path, draft_kind, dev)
        target_model, draft_model = target_runner.model, draft_runner.model
        if num_assistant_tokens is not None:
            draft_model.generation_config.num_assistant_tokens = num_assistant_tokens
            draft_model.generation_config.num_assistant_tokens_schedule = "constant"
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

        counter = _AcceptanceCounter()
        counter.install(target_model)
        encoded = [tokenizer(p, return_tensors="pt") for p in prompts if p.strip()]
        try:
            if warmup:
                with reporter.step("warm-up"):
                    first = encoded[0]
                    ids, mask = first["input_ids"].to(dev), first["attention_mask"].to(dev)
                    _generate(target_model, ids, mask, min(4, max_new_tokens), pad_id)
                    _generate(target_model, ids, mask, min(4, max_new_tokens), pad_id, draft_model)
            runs: list[PromptRun] = []
            with reporter.step(
                f"generating {len(encoded)} prompts x {max_new_tokens} tokens, twice", total=len(encoded)
            ) as step:
                for enc in encoded:
                    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
                    n_prompt = int(ids.shape[1])
                    _sync(dev)
                    t0 = time.perf_counter()
                    plain = _generate(target_model, ids, mask, max_new_tokens, pad_id)
                    _sync(dev)
                    t1 = time.perf_counter()
                    counter.reset()
                    assisted = _generate(target_model, ids, mask, max_new_tokens, pad_id, draft_model)
                    _sync(dev)
                    t2 = time.perf_counter()
                    a = plain[0, n_prompt:].tolist()
                    b = assisted[0, n_prompt:].tolist()
                    mismatch = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
                    if mismatch is None and len(a) != len(b):
                        mismatch = min(len(a), len(b))
                    runs.append(
                        PromptRun(
                            prompt_tokens=n_prompt,
                            target_new_tokens=len(a),
                            assisted_new_tokens=len(b),
                            target_seconds=t1 - t0,
                            assisted_seconds=t2 - t1,
                            drafted_tokens=counter.drafted,
                            accepted_tokens=counter.accepted,
                            rounds=counter.rounds,
                            identical=mismatch is None,
                            first_mismatch=mismatch,
                        )
                    )
                    step.advance()
        finally:
            counter.uninstall(target_model)

        settings = draft_model.generation_config
        n_assist = getattr(settings, "num_assistant_tokens", None)
        threshold = getattr(settings, "assistant_confidence_threshold", None)
        # transformers fills these in from its defaults when the draft's generation config leaves them unset
        defaults = (
            settings._get_default_generation_params() if hasattr(settings, "_get_default_generation_params") else {}
        )
        n_assist = n_assist if n_assist is not None else defaults.get("num_assistant_tokens")
        threshold = threshold if threshold is not None else defaults.get("assistant_confidence_threshold")

        drafted = sum(r.drafted_tokens for r in runs)
        accepted = sum(r.accepted_tokens for r in runs)
        rounds = sum(r.rounds for r in runs)
        t_tokens = sum(r.target_new_tokens for r in runs)
        a_tokens = sum(r.assisted_new_tokens for r in runs)
        t_tps = t_tokens / max(sum(r.target_seconds for r in runs), 1e-9)
        a_tps = a_tokens / max(sum(r.assisted_seconds for r in runs), 1e-9)
        return SpeculativeResult(
            target=target,
            draft=draft,
            draft_runner=draft_kind,
            device=dev,
            dtype=target_runner.dtype,
            max_new_tokens=max_new_tokens,
            prompts=len(runs),
            num_assistant_tokens=int(n_assist) if n_assist is not None else None,
            assistant_confidence_threshold=float(threshold) if threshold is not None else None,
            drafted_tokens=drafted,
            accepted_tokens=accepted,
            acceptance_rate=accepted / drafted if drafted else None,
            rounds=rounds,
            tokens_per_round=a_tokens / rounds if rounds else None,
            target_tokens_per_s=t_tps,
            assisted_tokens_per_s=a_tps,
            speedup=a_tps / t_tps if t_tps else 0.0,
            identical=all(r.identical for r in runs),
            per_prompt=runs,
            environment=environment(dev),
        )
    finally:
        if draft_runner is not None:
            draft_runner.close()
        target_runner.close()
