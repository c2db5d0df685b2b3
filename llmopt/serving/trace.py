"""Request traces: when each request arrives, its prompt and how many tokens it asks for.

The same trace (same seed) is replayed against the artifact and its baseline, so both see identical prompts in
the same order at the same times.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field, field_validator, model_validator

from llmopt.errors import DataError, InputError
from llmopt.units import WholeNumber


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class LengthDist(BaseModel):
    """A token-length distribution: ``128`` (fixed), ``64-256`` (uniform), ``normal:128,32``, ``exp:128``."""

    kind: str = "fixed"
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str | int, option: str) -> LengthDist:
        s = str(text).strip().lower()
        try:
            if re.fullmatch(r"\d+", s):
                dist = cls(kind="fixed", a=int(s))
            elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", s):
                dist = cls(kind="uniform", a=int(m[1]), b=int(m[2]))
            elif m := re.fullmatch(r"normal:\s*([\d.]+)\s*,\s*([\d.]+)", s):
                dist = cls(kind="normal", a=float(m[1]), b=float(m[2]))
            elif m := re.fullmatch(r"exp:\s*([\d.]+)", s):
                dist = cls(kind="exp", a=float(m[1]))
            else:
                raise ValueError(s)
        except ValueError:
            raise InputError(
                f"{option} {text!r} is not a length distribution.",
                "Write a number (128), a range (64-256), normal:MEAN,SD or exp:MEAN.",
            ) from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a):
            raise InputError(f"{option} {text!r}: lengths must be at least 1 and ranges ascending.", "E.g. 64-256.")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.a, self.b)))
        return max(1, round(rng.expovariate(1.0 / self.a)))

    def __str__(self) -> str:
        return {
            "fixed": f"{self.a:g}",
            "uniform": f"{self.a:g}-{self.b:g}",
            "normal": f"normal:{self.a:g},{self.b:g}",
            "exp": f"exp:{self.a:g}",
        }[self.kind]


class TraceSpec(BaseModel):
    """How requests are generated. Either Poisson arrivals at each of ``rates`` (requests/s) or ``concurrency``
    clients each sending its next request when the last one finished."""

    rates: list[float] | None = None
    concurrency: WholeNumber | None = Field(default=None, ge=1)
    requests: WholeNumber = Field(default=32, ge=1)
    warmup: WholeNumber = Field(default=2, ge=0)
    prompt_len: LengthDist = LengthDist(kind="fixed", a=128)
    output_len: LengthDist = LengthDist(kind="fixed", a=64)
    prefix_len: WholeNumber = Field(default=0, ge=0)
    prefix_share: float = Field(default=0.0, ge=0.0, le=1.0)
    prompts_file: str | None = None
    seed: WholeNumber = 0

    @field_validator("rates")
    @classmethod
    def _positive(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (not v or any(not (r > 0 and math.isfinite(r)) for r in v)):
            raise ValueError("rates must be positive numbers")
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> TraceSpec:
        if (self.rates is None) == (self.concurrency is None):
            raise ValueError("give either rates or concurrency")
        if self.prefix_share > 0 and self.prefix_len == 0:
            raise ValueError("a prefix share needs a prefix length")
        return self

    def points(self) -> list[tuple[str, float]]:
        """(mode, value) per load point: ("rate", r) ... or ("concurrency", n)."""
        if self.rates is not None:
            return [("rate", r) for r in self.rates]
        assert self.concurrency is not None
        return [("concurrency", float(self.concurrency))]


class TraceRequest(BaseModel):
    index: int
    arrival_s: float  # offset from the start of the timed phase; 0 for warm-up and concurrency mode
    prompt: str
    prompt_len: int  # target length in tokens (the server's usage reports the real one)
    max_tokens: int
    shared_prefix: bool = False
    warmup: bool = False


_WORDS = (  # noqa: SIM905 - a paragraph reads better than 110 quoted words
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out who about up what "
    "time said them into some could other then only its two may first over new these see way like people many "
    "water years after most also did called made through long where world before great back much between because "
    "each part country city river state war church king law land house system history form number"
).split()


def _token_pool(tokenizer: Tokenizer | None) -> list[int] | None:
    if tokenizer is None:
        return None
    ids = tokenizer.encode(" ".join(_WORDS * 4), add_special_tokens=False)
    return sorted(set(ids)) or None


def _text(n: int, rng: random.Random, tokenizer: Tokenizer | None, pool: list[int] | None) -> str:
    """About ``n`` tokens of ordinary words: exact through the tokenizer when one is known (ids of common
    words, decoded), else ``n`` words (the server's usage then tells the real token count)."""
    if tokenizer is not None and pool:
        return tokenizer.decode([rng.choice(pool) for _ in range(n)])
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: JSONL (``{"prompt": ...}`` or ``{"text": ...}`` per line) or plain text, one per
    non-empty line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"prompts file {path} does not exist or is not a file.", "Give a .txt or .jsonl file.")
    try:
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"prompts file {path} cannot be read as UTF-8 text ({exc}).", "Give a text file.") from None
    prompts: list[str] = []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                obj: Any = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{number} is not valid JSON.", "One JSON object per line.") from None
            value = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise DataError(f'{path}:{number} has no "prompt" (or "text") string.', 'Write {"prompt": "..."}.')
            prompts.append(value)
        else:
            prompts.append(line)
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompts.", "One prompt per line (or JSONL).")
    return prompts


def build_trace(
    spec: TraceSpec, mode: str, value: float, tokenizer: Tokenizer | None = None, *, point: int = 0
) -> list[TraceRequest]:
    """Warm-up requests, then ``spec.requests`` timed ones. Arrivals are Poisson at rate ``value`` (exponential
    gaps), or all at 0 for concurrency mode. Deterministic in (seed, point)."""
    rng = random.Random(f"{spec.seed}:{point}")
    text_rng = random.Random(f"{spec.seed}:text")  # the shared prefix is the same at every point
    pool = _token_pool(tokenizer)
    prefix = _text(spec.prefix_len, text_rng, tokenizer, pool) if spec.prefix_len else ""
    file_prompts = read_prompts(spec.prompts_file) if spec.prompts_file else None
    out: list[TraceRequest] = []
    t = 0.0
    for i in range(spec.warmup + spec.requests):
        warm = i < spec.warmup
        if not warm and mode == "rate" and i > spec.warmup:
            t += rng.expovariate(value)
        max_tokens = spec.output_len.sample(rng)
        if file_prompts is not None:
            body = file_prompts[rng.randrange(len(file_prompts))]
            n = 0
        else:
            n = spec.prompt_len.sample(rng)
            body = _text(n, rng, tokenizer, pool)
        shared = bool(prefix) and rng.random() < spec.prefix_share
        prompt = f"{prefix}\n\n{body}" if shared else body
        out.append(
            TraceRequest(
                index=i,
                arrival_s=0.0 if warm or mode != "rate" else t,
                prompt=prompt,
                prompt_len=n + (spec.prefix_len if shared else 0),
                max_tokens=max_tokens,
                shared_prefix=shared,
                warmup=warm,
            )
        )
    return out
