"""What was measured: the typed results that flow evaluation -> gate -> manifest -> report / CLI / Hub card.

Ground floor, like specs.py: nothing of llmopt above ``specs`` is imported here (but for serve-bench's
per-load-point result, ``llmopt.serving.metrics.PointResult``, stdlib and pydantic like this module).
Field names are the JSON keys (schemas ``llmopt.eval/2`` and ``llmopt.run/1``, documented in README.md), so
``model_dump(mode="json")`` writes the same JSON the dict reports did, and every report written before still loads:

- Results accept keys they do not know (``extra="allow"``) and write them back unchanged: a file from another
  llmopt version keeps what it carries (a key dropped since, a block a newer version adds), and a hand edit
  stays visible to the integrity check instead of vanishing on load.
- A key that was absent in the dict reports when it had no value (``kernel``, ``compute``, ``placement``,
  ``cached`` ...) is left out of the JSON while it is None; the keys that were written as ``null``
  (``settings.max_tokens``, ``size_ratio``, a gate check's ``value`` ...) are listed in ``_keep_none``.
- Old callers read a report with keys (``report["delta_pct"]``): ``__getitem__``/``get`` answer with the
  attribute. New code reads attributes.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from llmopt.serving.metrics import PointResult
from llmopt.specs import EvalSpec, GateSpec, ServingSpec, ThroughputSpec

# llmopt.eval/2: the blocks added to /1 while it was current are part of the documented schema: the artifact's
# ``distribution`` (KL divergence, top-1 agreement, Δp against FP16), each side's lm-eval ``tasks`` and
# ``task_recovery``. A /1 report has the same keys where it has them (older ones lack those blocks) and reads as
# it is; a report of a later version is refused (its fields may mean what this version does not know).
EVAL_SCHEMA = "llmopt.eval/2"
EVAL_SCHEMAS_READ = ("llmopt.eval/1", EVAL_SCHEMA)
# The run report and the manifest keep their versions: they embed evaluation reports whole, each with its own
# ``schema``, and gained no key of their own (a run may hold /1 evaluations it reused next to /2 ones).
RUN_SCHEMA = "llmopt.run/1"
SERVING_SCHEMA = "llmopt.serving/1"

__all__ = [
    "EVAL_SCHEMA",
    "EVAL_SCHEMAS_READ",
    "RUN_SCHEMA",
    "Distribution",
    "EvalReport",
    "EvalSettings",
    "GGUFFileRow",
    "GGUFRepoPublish",
    "GateCheck",
    "GateResult",
    "LeftOutVariant",
    "ModelScore",
    "QuantizeOutcome",
    "RunReport",
    "RunState",
    "ServingReport",
    "SpeedReport",
    "TaskComparison",
    "TaskScore",
    "TasksReport",
    "UploadedFile",
    "VariantError",
    "VariantOutcome",
    "eval_schema_problem",
    "newer_eval_schema",
]


_EVAL_SCHEMA_RE = re.compile(r"llmopt\.eval/([1-9][0-9]{0,8})")


def _eval_version(schema: object) -> int | None:
    """N of ``llmopt.eval/N`` (ASCII digits, no leading zero); None for anything else."""
    match = _EVAL_SCHEMA_RE.fullmatch(schema) if isinstance(schema, str) else None
    return int(match.group(1)) if match else None


def newer_eval_schema(schema: object) -> bool:
    """Whether ``schema`` is an evaluation report's of a later version than this llmopt writes."""
    version = _eval_version(schema)
    return version is not None and version > (_eval_version(EVAL_SCHEMA) or 0)


def eval_schema_problem(schema: object) -> str | None:
    """Why this llmopt does not read an evaluation report of ``schema``; None when it does."""
    if schema in EVAL_SCHEMAS_READ:
        return None
    reads = " and ".join(EVAL_SCHEMAS_READ)
    if newer_eval_schema(schema):
        return f"schema {schema} was written by a newer llmopt (this one reads {reads}): upgrade llmopt to read it"
    return f"schema {schema!r} is not an evaluation report's (this llmopt reads {reads})"


class Result(BaseModel):
    """Base of every result: JSON keys = field names; unknown keys kept; None left out unless in ``_keep_none``."""

    # NaN (a stderr of one window) is written as NaN, as json.dump always wrote it.
    model_config = ConfigDict(extra="allow", ser_json_inf_nan="constants", validate_assignment=True)
    _keep_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_none(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        data = handler(self)
        fields = type(self).model_fields
        return {k: v for k, v in data.items() if v is not None or k in self._keep_none or k not in fields}

    def __getitem__(self, key: str) -> Any:
        """Key access for callers written against the dict reports (read-only)."""
        fields = type(self).model_fields
        name = next((n for n, f in fields.items() if f.alias == key), key)
        if name in fields or name in (self.model_extra or {}):
            return getattr(self, name)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready dict (what report files, manifests and ``--json`` carry)."""
        return self.model_dump(mode="json")


# --- one model's perplexity --------------------------------------------------------------------------


class Distribution(Result):
    """How far the artifact's next-token distribution moves from FP16's on the scored tokens (docs/kld.md).

    KL values are KL(P_fp16 || P_artifact) in nats per token, over FP16's ``top_k`` tokens plus the rest's mass (a
    lower bound of the full-vocabulary KL). ``window_kld``/``window_top1`` are the raw numbers the means and their
    errors follow from (recomputed before a stored evaluation is reused or published); the percentiles, the
    maximum and Δp need every token's value, which is not stored, and are trusted as recorded."""

    tokens: int = Field(description="Tokens scored (the same as perplexity's).")
    top_k: int = Field(description="FP16 tokens kept per position in the reference.")
    kld_mean: float
    kld_stderr: float = Field(description="From the spread of per-window means, as perplexity's error.")
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1_agreement: float = Field(description="Share (0-1) of tokens whose FP16 top token is also the artifact's.")
    top1_agreement_stderr: float
    delta_p_mean: float = Field(description="Mean of p_artifact - p_fp16 of the actual next token.")
    delta_p_rms: float = Field(description="Root mean square of that change.")
    # Optional only so that a manifest missing them still loads and the integrity check can name them.
    window_kld: list[float] | None = Field(None, description="Mean KL divergence of each window.")
    window_top1: list[float] | None = Field(None, description="Top-1 agreement of each window.")
    method: str | None = None


class TaskScore(Result):
    """One metric of one lm-eval task for one model (docs/tasks.md)."""

    task: str
    metric: str = Field(
        description="lm-eval's metric name (``acc``, ``acc_norm`` ...; ``NAME,FILTER`` past the default filter)."
    )
    value: float
    stderr: float | None = Field(description="lm-eval's standard error of the value.")
    n: int = Field(description="Examples scored.")
    higher_is_better: bool | None = None
    dataset: str | None = Field(None, description="The task's dataset (lm-eval's dataset_path; json etc. for local).")
    dataset_config: str | None = None
    # Optional: a metric computed over the whole corpus has no per-example values.
    doc_ids: list[int] | None = Field(None, description="The examples, by lm-eval's doc_id.")
    examples: list[float] | None = Field(None, description="Each example's value, in doc_ids' order: the raw numbers.")
    _keep_none = frozenset({"stderr"})


class TasksReport(Result):
    """One model's downstream accuracy: lm-eval tasks run on the loaded model (``--tasks``)."""

    requested: list[str] = Field(description="The tasks as asked for (names or local task files).")
    limit: int | None = Field(None, description="Examples per task (the first N; None: all).")
    harness: str | None = Field(None, description="lm-eval and its version.")
    files_sha256: str | None = Field(None, description="Of the local task files and their data.")
    scores: list[TaskScore] = Field(default_factory=list)
    not_run: str | None = Field(None, description="Why the tasks were not run on this model (e.g. not for gguf).")
    seconds: float | None = None
    cached: bool | None = None
    _keep_none = frozenset({"limit"})


class TaskComparison(Result):
    """One task metric, artifact against baseline on the same examples; recovery = artifact / baseline."""

    task: str
    metric: str
    baseline: float
    baseline_stderr: float | None = None
    artifact: float
    artifact_stderr: float | None = None
    recovery: float | None = Field(description="artifact / baseline (None when the baseline scored 0).")
    recovery_stderr: float | None = Field(
        description="Paired (delta method) from both models' per-example values; None for corpus-level metrics."
    )
    n: int
    primary: bool = Field(False, description="The metric the task's min_recovery gate reads.")
    _keep_none = frozenset({"recovery", "recovery_stderr"})


class ModelScore(Result):
    """One model's side of an evaluation: its perplexity on the shared windows and how it was computed."""

    perplexity: float
    stderr: float
    mean_nll: float
    tokens_scored: int
    windows: int
    # Optional only so that a manifest missing it still loads and the integrity check can name it.
    window_nll: list[float] | None = Field(None, description="Mean NLL of each window: the raw numbers.")
    footprint_bytes: int | None = None
    load_seconds: float | None = None
    eval_seconds: float | None = None
    runner: str | None = None
    dtype: str | None = None
    kernel: str | None = None
    compute: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None
    size_bytes: int | None = None
    # the baseline's side
    model: str | None = Field(None, description="The FP16 model as the user named it.")
    cached: bool | None = None
    # the artifact's side
    path: str | None = None
    backend: str | None = None
    format: str | None = None
    # Room for blocks other measurements add (left out of the JSON while unset):
    distribution: Distribution | None = Field(
        None,
        description="The artifact's next-token distributions against the baseline's (KL divergence, top-1 "
        "agreement, Δp): docs/kld.md.",
    )
    tasks: TasksReport | None = Field(None, description="Downstream accuracy (lm-eval tasks): docs/tasks.md.")
    # always written by api.evaluate, null or not
    _keep_none = frozenset({"footprint_bytes", "load_seconds", "eval_seconds", "runner", "dtype"})


class EvalSettings(Result):
    """What was scored: the text, its tokens, the windows and where (``settings`` of the report)."""

    dataset: str | None = None
    text_sha256: str | None = None
    tokens_sha256: str | None = None
    context_length: int
    stride: int
    add_bos: bool = False
    max_tokens: int | None = None
    tokens_total: int | None = None
    tokens_scored: int | None = None
    windows: int | None = None
    device: str | None = None
    placement: str | None = None
    dtype: str | None = None
    _keep_none = frozenset({"max_tokens"})

    @classmethod
    def of(cls, spec: EvalSpec, **measured: Any) -> EvalSettings:
        """The settings block of an evaluation made with ``spec``: what ``EvalReport.spec`` reads back."""
        return cls(
            dataset=spec.dataset,
            context_length=spec.context_length,
            stride=spec.resolved_stride(),
            add_bos=spec.add_bos,
            max_tokens=spec.max_tokens,
            **measured,
        )


class SpeedReport(Result):
    """The ``throughput`` block: both models' speed, measured one after the other with the same settings."""

    schema_: str | None = Field(None, alias="schema")
    device: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict, description="ThroughputSpec, resolved for the device.")
    baseline: dict[str, Any] = Field(default_factory=dict)
    artifact: dict[str, Any] = Field(default_factory=dict)
    decode_speedup: dict[str, float | None] = Field(default_factory=dict)
    prefill_speedup: dict[str, float | None] = Field(default_factory=dict)
    ttft_ratio: float | None = None
    memory_ratio: float | None = None
    size_ratio: float | None = None
    gpu_hourly_cost: float | None = None
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    _keep_none = frozenset({"ttft_ratio", "memory_ratio", "size_ratio"})

    def speedup_at(self, batch: int) -> float | None:
        value = self.decode_speedup.get(str(batch))
        return float(value) if value is not None else None

    def spec(self) -> ThroughputSpec:
        """The settings it was measured with (raises ValueError when they are not valid settings any more)."""
        return ThroughputSpec.model_validate(self.settings)


class ServingReport(Result):
    """One model served under load (``evaluation.serving`` of a recipe): serve-bench's load points for it.

    ``points`` are serve-bench's own (``llmopt.serving.metrics.PointResult``), each with the latency of every
    timed request, so the gate and ``llmopt estimate --slo`` can judge any SLO later. ``failed`` says why the
    measurement ended early (the server died): the points until then are kept, and the run marks the variant
    as errored."""

    schema_: str = Field(SERVING_SCHEMA, alias="schema")
    model: str | None = Field(None, description="What was served: the artifact folder, or the FP16 model.")
    model_sha256: str | None = Field(
        None, description="The FP16 model's weight hashes, digested (its stored measurement is reused only for them)."
    )
    spec: dict[str, Any] = Field(default_factory=dict, description="ServingSpec it was measured with.")
    server: dict[str, Any] = Field(default_factory=dict, description="Kind, command line, startup time, notes.")
    machine: str | None = None
    device: str | None = None
    tokenizer: str | None = None
    created: str | None = None
    points: list[PointResult] = Field(default_factory=list)
    saturation: dict[str, Any] = Field(default_factory=dict)
    failed: str | None = None
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    def serving_spec(self) -> ServingSpec | None:
        """The settings it was measured with; None when they are not valid settings any more."""
        try:
            return ServingSpec.model_validate(self.spec)
        except ValueError:
            return None

    def rate_points(self) -> list[PointResult]:
        return sorted((p for p in self.points if p.mode == "rate"), key=lambda p: p.value)


class GateCheck(Result):
    name: str
    value: float | None
    threshold: float
    passed: bool
    message: str
    # How far inside the threshold the value is, in the value's unit: positive passes, negative fails by that
    # much; None: not measured (and in records from before margins were kept).
    margin: float | None = None
    _keep_none = frozenset({"value"})


class GateResult(Result):
    """The gate applied to an evaluation; ``spec`` holds the thresholds it was applied with."""

    passed: bool
    checks: list[GateCheck]
    spec: GateSpec | None = None

    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]


class EvalReport(Result):
    """An artifact against its FP16 baseline on the same token ids (schema ``llmopt.eval/2``; ``/1`` still reads)."""

    schema_: str = Field(EVAL_SCHEMA, alias="schema")
    settings: EvalSettings
    baseline: ModelScore
    artifact: ModelScore
    delta_pct: float | None = None
    delta_pct_stderr: float | None = None
    size_ratio: float | None = None
    environment: dict[str, Any] = Field(default_factory=dict)
    artifact_files_sha256: str | None = None
    throughput: SpeedReport | None = None
    task_recovery: list[TaskComparison] | None = Field(
        None, description="Each task metric of both models, with recovery = artifact / baseline (docs/tasks.md)."
    )
    serving: ServingReport | None = Field(
        None, description="The artifact served under load (llmopt run with evaluation.serving)."
    )
    # The manifest keeps the gate apart (``Manifest.gate``); a report handed to callers carries it.
    gate: GateResult | None = None
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    _keep_none = frozenset({"size_ratio"})

    @field_validator("schema_")
    @classmethod
    def _readable_schema(cls, value: str) -> str:
        problem = eval_schema_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    def decode_speedup(self, batch: int) -> float | None:
        return self.throughput.speedup_at(batch) if self.throughput else None

    def packages(self) -> dict[str, Any]:
        return dict(self.environment.get("packages") or {})

    def without_gate(self) -> EvalReport:
        return self.model_copy(update={"gate": None})

    def spec(self) -> EvalSpec | None:
        """The evaluation settings this report answers, as far as it recorded them (``same_measurement`` compares
        the measurement fields only); None when they are not valid settings any more."""
        s = self.settings
        try:
            return EvalSpec(
                dataset=s.dataset,
                context_length=s.context_length,
                stride=s.stride,
                max_tokens=s.max_tokens,
                add_bos=s.add_bos,
                kld=self.artifact.distribution is not None,
                throughput=self.throughput.spec() if self.throughput else None,
                tasks=self.artifact.tasks.requested if self.artifact.tasks else None,
                task_limit=self.artifact.tasks.limit if self.artifact.tasks else None,
            )
        except ValueError:
            return None


# --- a run of a recipe -------------------------------------------------------------------------------


class QuantizeOutcome(Result):
    reused: bool
    seconds: float | None = None
    reason: str | None = None
    _keep_none = frozenset({"seconds", "reason"})


class VariantError(Result):
    stage: str
    type: str
    message: str
    hint: str | None = None
    exit_code: int
    traceback: str | None = None
    _keep_none = frozenset({"hint"})


Status = Literal["passed", "gate_failed", "error", "not_run"]
RunState = Literal["complete", "running", "interrupted", "incomplete"]
_SUMMARY = (
    "perplexity",
    "stderr",
    "delta_pct",
    "delta_pct_stderr",
    "size_bytes",
    "size_ratio",
    "footprint_bytes",
    "decode_speedup",
)


class VariantOutcome(Result):
    """One variant's row of a run report; the summary numbers are lifted out of its evaluation."""

    name: str
    method: str
    format: str | None = None
    status: Status
    artifact: str | None = None
    quantize: QuantizeOutcome | None = None
    evaluation_reused: bool | None = None
    evaluation: EvalReport | None = None
    gate: GateResult | None = None
    publish: dict[str, Any] | None = None
    error: VariantError | None = None
    # a variant's finished scores when its speed measurement was interrupted (status not_run) or failed (error),
    # shown but not gated nor stored: what is missing
    incomplete: str | None = None
    perplexity: float | None = None
    stderr: float | None = None
    delta_pct: float | None = None
    delta_pct_stderr: float | None = None
    size_bytes: int | None = None
    size_ratio: float | None = None
    footprint_bytes: int | None = None
    decode_speedup: dict[str, float | None] | None = None
    _keep_none = frozenset(
        {"format", "artifact", "quantize", "evaluation_reused", "evaluation", "gate", "publish", "error", *_SUMMARY}
    )

    def summarized(self) -> VariantOutcome:
        """A copy with the summary numbers filled from the evaluation where they are not set already."""
        ev = self.evaluation
        if ev is None:
            return self.model_copy()
        art = ev.artifact
        lifted: dict[str, Any] = {
            "perplexity": art.perplexity,
            "stderr": art.stderr,
            "delta_pct": ev.delta_pct,
            "delta_pct_stderr": ev.delta_pct_stderr,
            "size_bytes": art.size_bytes,
            "size_ratio": ev.size_ratio,
            "footprint_bytes": art.footprint_bytes,
            "decode_speedup": (ev.throughput.decode_speedup or None) if ev.throughput else None,
        }
        return self.model_copy(update={k: v for k, v in lifted.items() if getattr(self, k) is None})


class RunReport(Result):
    """``report.json`` of ``llmopt run`` (schema ``llmopt.run/1``; see report.py)."""

    schema_: str = Field(RUN_SCHEMA, alias="schema")
    llmopt_version: str | None = None
    created_at: str | None = None
    seconds: float | None = None
    output: str | None = None
    recipe: dict[str, Any] = Field(default_factory=dict)
    settings: EvalSettings | None = None
    baseline: ModelScore | None = None
    environment: dict[str, Any] | None = None
    state: RunState = "complete"
    variants: list[VariantOutcome] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    exit_code: int | None = None
    files: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    sources: list[str] | None = None
    baseline_serving: ServingReport | None = Field(
        None, description="The FP16 model served with the same trace, once per run (evaluation.serving.baseline)."
    )
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    _keep_none = frozenset({"seconds", "settings", "baseline", "environment", "exit_code"})


# --- publishing a run's GGUF files into one repo (llmopt/gguf_repo.py) --------------------------------------------


class UploadedFile(Result):
    path: str = Field(description="Path in the repo.")
    size: int


class GGUFFileRow(Result):
    """One ``.gguf`` file the repo holds after the commit: a row of the card's table."""

    path: str = Field(description="The file's path in the repo, e.g. SmolLM2-135M-Instruct-Q4_K_M.gguf.")
    quant_type: str | None = Field(description="llama.cpp's name of the type, upper case (Q4_K_M); None: unknown.")
    bit_width: str | None = None
    size: int
    sha256: str | None = None
    origin: Literal["this commit", "already in the repo"]
    variant: str | None = Field(None, description="The recipe variant (or artifact folder) it was made as.")
    record: str | None = Field(None, description="Its llmopt manifest in the repo (llmopt/NAME.json); None: none.")
    note: str | None = Field(None, description="Why the row shows no numbers (no record, record of another file).")
    perplexity: float | None = None
    perplexity_stderr: float | None = None
    baseline_perplexity: float | None = None
    delta_pct: float | None = None
    delta_pct_stderr: float | None = None
    kld_mean: float | None = None
    kld_stderr: float | None = None
    gate_passed: bool | None = None
    gate_checks: list[str] = Field(default_factory=list, description="The gate's thresholds: 'Δ ≤ +5%', 'KLD ≤ 0.05'.")
    measured_on: str | None = Field(
        None, description="What the numbers were scored on (text hash, tokens, window): rows compare when equal."
    )
    source_weights: str | None = Field(None, description="A digest of the source model's weight hashes.")


class LeftOutVariant(Result):
    """A GGUF artifact of the run that is not published: its gate failed, or it was never gated."""

    variant: str
    quant_type: str | None = None
    reason: str


class GGUFRepoPublish(Result):
    """What ``publish_gguf_repo`` uploaded (or, with ``dry_run``, would upload) in its one commit."""

    repo_id: str
    revision: str | None = None
    private: bool = False
    dry_run: bool = False
    files: list[UploadedFile] = Field(default_factory=list, description="This commit's files.")
    total_bytes: int = 0
    table: list[GGUFFileRow] = Field(default_factory=list, description="Every .gguf file the repo holds after it.")
    left_out: list[LeftOutVariant] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list, description="Artifacts that are not GGUF, and why.")
    card: str | None = None
    notes: list[str] = Field(default_factory=list)
    url: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    commit_message: str | None = None
    _keep_none = frozenset({"revision", "url", "commit_url", "commit_oid"})
