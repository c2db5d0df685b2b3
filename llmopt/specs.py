"""What to measure: evaluation, throughput, calibration and gate settings, each one typed model.

Ground floor: this module imports nothing of llmopt above ``errors`` (and no torch), so the recipe, the CLI,
the library entry points and the pipeline all build and pass the same objects. A spec is built once, from a
recipe (recipe.py: CLI flag > recipe file > defaults) or from CLI flags (``eval_spec`` and friends turn a
meaningless value into bad input, exit 2), and handed down whole.

Reuse of a stored measurement compares specs whole (``EvalSpec.same_measurement``): a field added here
takes part in that comparison unless it is marked ``NotMeasured`` (with the reason).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llmopt.errors import DataError, InputError, LlmoptError

# The trace of a serving benchmark is serve-bench's own type (stdlib + pydantic only, like this module).
from llmopt.serving.trace import LengthDist, TraceSpec
from llmopt.units import WholeNumber

__all__ = [
    "CPU_DEFAULTS",
    "GPU_DEFAULTS",
    "CalibrationSpec",
    "DecodeMode",
    "EvalSpec",
    "GateSpec",
    "ServingSpec",
    "ThroughputSpec",
    "check_settings",
    "eval_spec",
    "gate_spec",
]

DecodeMode = Literal["auto", "compile", "graph", "eager"]

# Grids used when the caller leaves them unset: serving-sized on GPU, tiny on CPU (CI runs there).
GPU_DEFAULTS: dict[str, Any] = {"batch_sizes": [1, 8, 32], "prompt_lens": [128, 512, 2048], "gen_len": 128}
CPU_DEFAULTS: dict[str, Any] = {"batch_sizes": [1, 4], "prompt_lens": [32, 128], "gen_len": 16}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _split_task_list(text: str) -> list[str]:
    """``a,b`` split at its commas, except inside the path of a task file that exists: a folder named like `a,b`
    (scripts/prepare_tasks.py writes to any --out) was split into two entries, neither of them a task."""
    parts = text.split(",")
    out: list[str] = []
    i = 0
    while i < len(parts):
        j = i + 1
        for end in range(len(parts), i + 1, -1):  # the longest run of pieces that is a task file
            candidate = ",".join(parts[i:end]).strip()
            if candidate.lower().endswith((".yaml", ".yml")) and Path(candidate).is_file():
                j = end
                break
        out.append(",".join(parts[i:j]))
        i = j
    return out


@dataclass(frozen=True)
class NotMeasured:
    """Marks a field that changes how a measurement is made, not what it measures (see ``same_measurement``)."""

    why: str


class ThroughputSpec(_Strict):
    """What to measure of serving speed. Unset grids take the device's defaults (see ``resolved``)."""

    batch_sizes: list[WholeNumber] | None = Field(
        default=None, description="Decode batch sizes (default GPU 1,8,32; CPU 1,4)."
    )
    prompt_lens: list[WholeNumber] | None = Field(
        default=None,
        description="Prefill prompt lengths; decoding starts after the first (default GPU 128,512,2048).",
    )
    gen_len: WholeNumber | None = Field(
        default=None, ge=2, description="Tokens generated per timed decode run (GPU default 128)."
    )
    warmup: WholeNumber = Field(default=2, ge=0, description="Untimed runs before timing each point.")
    repetitions: WholeNumber = Field(
        default=5, ge=1, description="Timed runs per point; medians and spread are over these."
    )
    max_seconds_per_point: float = Field(
        default=30.0,
        gt=0,
        description="Time budget of one decode point: when one run is slow (eager decoding, a CPU), warm-up drops to "
        "one run and the repetitions stop at what fits (never fewer than 2); the result says how many ran.",
    )
    decode_mode: DecodeMode = Field(default="auto", description="compile, graph, eager, or auto (best that works).")
    gpu_hourly_cost: float | None = Field(
        default=None, gt=0, description="Price of the device per hour, for $/1M tokens."
    )
    seed: WholeNumber = Field(default=0, description="Seed of the random prompt token ids.")
    marlin_atomics: bool = Field(
        default=True,
        description="GPTQ-Marlin: atomicAdd split-K reduction on narrow-output layers while measuring speed "
        "(as GPTQModel does for AWQ-Marlin); perplexity is always scored without it.",
    )

    @field_validator("batch_sizes", "prompt_lens")
    @classmethod
    def _positive_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v or any(x < 1 for x in v):
            raise ValueError("needs one or more positive integers")
        return sorted(set(v))

    def resolved(self, device: str) -> ThroughputSpec:
        """A copy with every unset grid filled from the device's defaults."""
        defaults = CPU_DEFAULTS if device == "cpu" else GPU_DEFAULTS
        update = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return self.model_copy(update=update)

    @property
    def context_len(self) -> int:
        """Prompt length decoding starts from: the first prompt length."""
        assert self.prompt_lens
        return self.prompt_lens[0]


class ServingSpec(TraceSpec):
    """Serving under load for every variant of ``llmopt run`` (the recipe's ``evaluation.serving``): serve-bench's
    trace (rates, requests, lengths, ...) plus how the server is started. GGUF artifacts are served by llama.cpp's
    server, model folders by `transformers serve`; the SLO itself is a gate (``gates.slo``, ``gates.min_goodput``)."""

    model_config = ConfigDict(extra="forbid")

    requests: WholeNumber = Field(default=16, ge=1, description="Timed requests per rate.")
    warmup: WholeNumber = Field(default=1, ge=0, description="Untimed requests before each rate (one at a time).")
    server: Literal["auto", "llama.cpp", "transformers", "vllm"] = Field(
        "auto", description="auto: GGUF -> llama.cpp's server, model folder -> transformers serve; or vllm."
    )
    baseline: bool = Field(
        True, description="Also serve the FP16 model once per run with the same trace, for comparison."
    )
    port: WholeNumber | None = Field(
        None, ge=1, le=65535, description="Port of the started server (default: a free one)."
    )
    parallel: WholeNumber = Field(4, ge=1, description="llama.cpp slots (sequences decoded together).")
    threads: WholeNumber | None = Field(None, ge=1, description="llama.cpp CPU threads (default: its own).")
    context: WholeNumber = Field(2048, ge=16, description="Context tokens per sequence of the server.")
    prefix_caching: bool | None = Field(None, description="The server's prefix caching (default: its own).")
    ignore_eos: bool | None = Field(
        None, description="Generate output_len tokens always (default: where the server supports it)."
    )
    server_args: list[str] = Field(default_factory=list, description="Extra command-line arguments of the server.")
    startup_timeout: float = Field(300.0, gt=0, description="Seconds to wait for the server to be ready.")
    request_timeout: float = Field(300.0, gt=0, description="Seconds before a request counts as failed.")
    gpu_hourly_cost: float | None = Field(
        None, gt=0, description="Price of the machine per hour: cost per million output tokens at each rate."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_rate(cls, data: Any) -> Any:
        # `serving: {}` measures one rate, 1 request/s
        if isinstance(data, dict) and data.get("rates") is None and data.get("concurrency") is None:
            return {**data, "rates": [1.0]}
        return data

    @field_validator("prompt_len", "output_len", mode="before")
    @classmethod
    def _length(cls, value: Any) -> Any:
        if isinstance(value, str | int) and not isinstance(value, bool):
            try:
                return LengthDist.parse(value, "length")
            except LlmoptError as exc:
                text = f"{value!r} is not a length: {exc.hint}"
                raise PydanticCustomError("length", "{text}", {"text": text}) from None
        return value

    @field_serializer("prompt_len", "output_len")
    def _length_text(self, value: LengthDist) -> str:
        return str(value)

    def trace(self) -> TraceSpec:
        """The trace part alone, as serve-bench takes it."""
        return TraceSpec(**{name: getattr(self, name) for name in TraceSpec.model_fields})


class CalibrationSpec(_Strict):
    dataset: str | None = Field(
        None, description="Calibration text: .txt/.jsonl/.parquet file or a named dataset (wikitext2, c4)."
    )
    samples: WholeNumber = Field(128, ge=1, description="Number of calibration samples.")
    seq_len: WholeNumber = Field(512, ge=16, description="Tokens per calibration sample (16 or more).")
    seed: WholeNumber = Field(0, description="Seed for picking the samples.")


class EvalSpec(_Strict):
    """How an artifact is evaluated against its FP16 baseline (the recipe's ``evaluation`` section)."""

    dataset: str = Field(description="Evaluation text: .txt/.jsonl/.parquet file or a named dataset.")
    context_length: WholeNumber = Field(512, ge=2, description="Tokens per window.")
    stride: WholeNumber | None = Field(
        None, ge=1, description="Tokens between window starts (default: context_length)."
    )
    max_tokens: WholeNumber | None = Field(None, ge=2, description="Score only the first N tokens of the text.")
    add_bos: bool = Field(False, description="Put BOS before each window.")
    batch_size: Annotated[WholeNumber, NotMeasured("the same windows are scored, however many per pass")] = Field(
        1, ge=1, description="Windows per forward pass."
    )
    # "auto" names different hardware on different machines: what it resolved to is compared instead
    # (the report's settings.device and settings.placement), by the caller that resolved it.
    device: Annotated[str, NotMeasured("compared by what it resolves to")] = Field(
        "auto",
        description="auto, cpu, cuda (layers split over every visible GPU), cuda:1 (one GPU), cuda:0,1 (split over "
        "those): see README 'Devices and several GPUs'.",
    )
    kernel: Annotated[str | None, NotMeasured("not recorded by evaluations; reuse never compared it")] = Field(
        None, description="GPTQ/AWQ kernel (GPTQModel backend name); default: its choice."
    )
    kld: bool = Field(
        True,
        description="Also the KL divergence, top-1 agreement and Δp against FP16 on the same tokens (docs/kld.md; "
        "needed by the max_kld and min_top1_pct gates); false = perplexity alone.",
    )
    throughput: ThroughputSpec | None = Field(
        None,
        description="Also measure serving speed against FP16 (needed by the min_decode_speedup gate); "
        "{} takes the device's default grids.",
    )
    tasks: list[str] | None = Field(
        None,
        description="Downstream accuracy: lm-eval task names or local task YAML files, run on the baseline and the "
        "artifact (docs/tasks.md; needs the tasks extra; needed by the min_recovery gate).",
    )
    task_limit: WholeNumber | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Examples per task (the first N, the same for both models); default: all.",
    )
    serving: Annotated[
        ServingSpec | None, NotMeasured("measured after the evaluation (llmopt run), reused by its own spec")
    ] = Field(
        None,
        description="`llmopt run`: also serve each variant under load (serve-bench's trace: rates, requests, "
        "prompt_len, output_len, ...), needed by the gates slo and min_goodput; docs/serving.md.",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):  # "a,b" as --tasks and --set evaluation.tasks=a,b write it
            v = _split_task_list(v)
        if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
            raise ValueError("needs a list of task names (or task files), or one string of them joined by commas")
        names = [t.strip() for t in v]
        if not names or any(not t for t in names):
            raise ValueError("needs one or more task names (or task files), none of them empty")
        return list(dict.fromkeys(names))

    def resolved_stride(self) -> int:
        return self.stride if self.stride is not None else self.context_length

    @classmethod
    def measurement_fields(cls) -> list[str]:
        """The fields a stored measurement must share with this spec to be reused."""
        return [
            name
            for name, info in cls.model_fields.items()
            if not any(isinstance(m, NotMeasured) for m in info.metadata)
        ]

    def measurement(self, device: str) -> dict[str, Any]:
        """The measurement fields with defaults resolved as the evaluation resolves them (stride, speed grids)."""
        out: dict[str, Any] = {}
        for name in self.measurement_fields():
            value = getattr(self, name)
            if name == "stride":
                value = self.resolved_stride()
            elif name == "throughput" and value is not None:
                value = value.resolved(device).model_dump(mode="json")
            elif isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            out[name] = value
        return out

    def same_measurement(self, wanted: EvalSpec, device: str) -> bool:
        """Whether a measurement made with this spec (a stored one) answers ``wanted`` on ``device`` (the resolved
        primary device). Every measurement field must match; a stored speed measurement is not needed when
        ``wanted`` asks for none (it is then carried along, as it always was)."""
        mine, theirs = self.measurement(device), wanted.measurement(device)
        if theirs.get("throughput") is None:
            mine.pop("throughput", None)
            theirs.pop("throughput", None)
        if not theirs.get("kld"):  # likewise a stored KL divergence, when none is asked for
            mine.pop("kld", None)
            theirs.pop("kld", None)
        if theirs.get("tasks") is None:  # and task accuracies
            for key in ("tasks", "task_limit"):
                mine.pop(key, None)
                theirs.pop(key, None)
        return mine == theirs


class GateSpec(BaseModel):
    """Thresholds; a threshold left unset is not checked."""

    # A negative limit or NaN makes a gate nothing can pass (or, for NaN, that compares false everywhere)
    # and prints as "limit +-5%": refused up front rather than recorded as a meaningful check.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_ppl_increase_pct: float | None = Field(
        None, ge=0, description="Largest allowed perplexity increase over FP16, % (0 or more)."
    )
    max_ppl: float | None = Field(None, gt=0, description="Largest allowed absolute perplexity.")
    max_kld: float | None = Field(
        None, ge=0, description="Largest allowed mean KL divergence KL(FP16 || artifact) per token, nats (0 or more)."
    )
    min_top1_pct: float | None = Field(
        None,
        ge=0,
        le=100,
        description="Smallest allowed top-1 agreement with FP16: % of tokens whose most likely next token is "
        "unchanged (0-100).",
    )
    min_decode_speedup: float | None = Field(None, gt=0, description="Smallest decode speedup over FP16.")
    min_recovery: float | None = Field(
        None,
        gt=0,
        strict=True,  # `true` or '0.9' in a recipe is a mistake, not 1.0 / 0.9
        description="Smallest allowed task accuracy recovery (artifact / FP16) of every --tasks task, read on its "
        "acc_norm (else acc): e.g. 0.95.",
    )
    at_batch: WholeNumber = Field(1, ge=1, description="Batch size at which the decode speedup is read.")
    slo: dict[str, float] | None = Field(
        None,
        description="Serving latency targets in ms on percentiles, e.g. {ttft_p95_ms: 500, itl_p95_ms: 50} "
        "(ttft|itl|tpot|e2e, p50|p90|p95|p99; a _s suffix for seconds); needs evaluation.serving.",
    )
    min_goodput: float | None = Field(
        None,
        ge=0,
        strict=True,
        description="Smallest goodput (requests/s meeting every slo target); needs evaluation.serving.",
    )
    slo_at_rate: float | None = Field(
        None, gt=0, description="The swept request rate at which slo and min_goodput are read (default: every rate)."
    )

    @field_validator("slo")
    @classmethod
    def _slo_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        from llmopt.serving.metrics import slo_from_limits

        try:
            if not value:
                raise ValueError("slo gives no target: e.g. {ttft_p95_ms: 500}")
            slo_from_limits(value)
        except ValueError as exc:  # it names the bad key
            raise PydanticCustomError("slo", "{text}", {"text": str(exc)}) from None
        return value

    def serving_slo(self) -> Any:
        """The serving SLO these thresholds ask for (llmopt.serving.metrics.Slo), or None."""
        if not self.needs_serving():
            return None
        from llmopt.serving.metrics import slo_from_limits

        return slo_from_limits(self.slo or {}, min_goodput=self.min_goodput, at_rate=self.slo_at_rate)

    def needs_serving(self) -> bool:
        return self.slo is not None or self.min_goodput is not None

    def is_empty(self) -> bool:
        return all(
            v is None
            for v in (
                self.max_ppl_increase_pct,
                self.max_ppl,
                self.max_kld,
                self.min_top1_pct,
                self.min_decode_speedup,
                self.min_recovery,
                self.slo,
                self.min_goodput,
            )
        )

    @model_serializer(mode="wrap")
    def _unset_kld_left_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Thresholds added with the KL divergence are written only when set: a gate record from before them
        # reads and writes back the same, and its recomputation (evaluate/gate.py) finds the same checks.
        data: dict[str, Any] = handler(self)
        for key in ("max_kld", "min_top1_pct", "min_recovery", "slo", "min_goodput", "slo_at_rate"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def needs_distribution(self) -> bool:
        """True when a threshold reads the KL divergence block (which --no-kld leaves out)."""
        return self.max_kld is not None or self.min_top1_pct is not None


def gate_spec(**thresholds: Any) -> GateSpec:
    """A GateSpec from command-line values; a meaningless threshold is bad input (exit 2), not a traceback."""
    try:
        return GateSpec(**thresholds)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "gate"
        flag = "--" + name.replace("_pct", "").replace("_", "-")
        raise InputError(
            f"{flag} {err.get('input')!r} is not a usable threshold: {err['msg']}.",
            "Give a finite number: a percentage of 0 or more for --max-ppl-increase, 0 to 100 for --min-top1, "
            "0 or more for --max-kld, a positive number for --max-ppl, --min-decode-speedup and --min-recovery.",
        ) from None


def check_settings(
    context_length: int,
    stride: int | None = None,
    batch_size: int = 1,
    *,
    add_bos: bool = False,
    max_tokens: int | None = None,
) -> None:
    """Refuse scoring settings that cannot work, before any model is loaded (each names its own option)."""
    shortest = 3 if add_bos else 2  # two scored positions need two tokens of text, plus BOS when added
    if context_length < shortest:
        raise DataError(
            f"--context {context_length} is too short: a window needs at least {shortest} tokens.",
            "Use --context 16 or more (default 512).",
        )
    if stride is not None and not 1 <= stride <= context_length:
        raise DataError(
            f"--stride {stride} must be between 1 and --context ({context_length}).",
            "Pass a --stride no larger than --context, or leave it out (= --context).",
        )
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1.", "Pass --batch-size 1 or more (default 1).")
    if max_tokens is not None and max_tokens < 2:
        raise InputError("--max-tokens must be at least 2.", "Pass a larger --max-tokens, or leave it out.")


# CLI spelling of the EvalSpec fields whose flag is not the field's name.
_FLAGS = {"context_length": "--context"}


def eval_spec(**settings: Any) -> EvalSpec:
    """An EvalSpec from command-line values (field names as keywords).

    Window settings that cannot work are refused first by ``check_settings``, whose messages name the flag
    and the way out; any other invalid value is bad input too (exit 2), never a traceback.
    """
    check_settings(
        settings.get("context_length", 512),
        settings.get("stride"),
        settings.get("batch_size", 1),
        add_bos=bool(settings.get("add_bos")),
        max_tokens=settings.get("max_tokens"),
    )
    try:
        return EvalSpec.model_validate(settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "evaluation"
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        raise InputError(f"{flag} {err.get('input')!r}: {err['msg']}.", "See `llmopt eval --help`.") from None
