"""The library's entry points: what the CLI (and any Python caller) uses.

quantize -> evaluate (-> gate) -> publish. Each is a plain function; heavy libraries are imported
inside them, never at ``import llmopt``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from llmopt import __version__, interrupt
from llmopt.artifact import (
    Artifact,
    CalibrationInfo,
    EnvironmentInfo,
    Manifest,
    SourceInfo,
    files_digest,
    hash_tree,
    sha256_json,
)
from llmopt.atomic import give_plain_modes, sweep_dead_writers
from llmopt.errors import (
    DataError,
    InputError,
    InterruptedRunError,
    LlmoptError,
    OutputPathError,
    TokenizerMismatchError,
)
from llmopt.evaluate.gate import apply_gate
from llmopt.outputs import (
    check_output,
    check_report_file,
    is_no_space,
    make_parents,
    no_space_error,
    output_lock,
    remove_empty,
)
from llmopt.progress import Reporter, SilentReporter
from llmopt.results import EVAL_SCHEMA, EvalReport, EvalSettings, ModelScore, SpeedReport, TasksReport
from llmopt.specs import EvalSpec, GateSpec, check_settings, eval_spec

if TYPE_CHECKING:
    from llmopt.evaluate.tasks import TaskPlan

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "EVAL_SCHEMA",
    "EvalReport",
    "EvalSpec",
    "check_output",
    "check_report_file",
    "evaluate",
    "quantize",
    "sweep_stale_partials",
]


def sweep_stale_partials(out: Path) -> list[Path]:
    """Remove hidden ``.NAME.llmopt-partial-PID`` / ``-old-PID`` folders next to ``out`` left by a process that
    no longer runs (a library caller killed by a signal, a crash). Folders of live processes are kept."""
    removed: list[Path] = []
    for kind in ("partial", "old"):
        removed += sweep_dead_writers(out.parent, f".{out.name}.llmopt-{kind}-*", lambda name: name.rsplit("-", 1)[-1])
    return removed


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.llmopt-partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        staging.mkdir()
    except OSError as exc:
        raise OutputPathError(
            f"cannot write in {out.parent}: {exc.strerror}.", "Choose an -o folder in a place you can write to."
        ) from None
    return staging


def _input_paths(model: str, calibration: str | None, opts: Any) -> list[str | Path | None]:
    """What the user's own files among a quantize's inputs may be (names and Hub ids are skipped later)."""
    imatrix = getattr(opts, "imatrix", None)
    return [model, calibration, imatrix if imatrix not in (None, "none", "auto") else None]


def _swap_into_place(staging: Path, out: Path) -> None:
    """Put the finished folder at ``out``; an old one is removed only once the new one is complete."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.llmopt-old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _guarded_output(fn: Callable[P, R]) -> Callable[P, R]:
    """Around quantize: the output checks (``check_output``) before anything else, and the output's lock held
    for the whole call, so a second run into the same folder fails at once instead of replacing this one's.
    Parent folders made for the output are removed again (while empty) when the call fails."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from llmopt.backends.base import get_backend

        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        opts = get_backend(a["method"]).parse_options(a["options"] or {})
        inputs = _input_paths(a["model"], a["calibration"], opts)
        out = check_output(a["output"], inputs, overwrite=a["overwrite"])
        created = make_parents(out.parent)
        try:
            with output_lock(out):
                check_output(a["output"], inputs, overwrite=a["overwrite"])  # again: no other run can change it now
                a["output"] = out
                call: Callable[..., R] = fn
                return call(*bound.args, **bound.kwargs)
        except BaseException:
            remove_empty(created)
            raise

    return wrapper


@_guarded_output
def quantize(
    model: str,
    method: str,
    output: str | Path,
    *,
    options: dict[str, Any] | None = None,
    calibration: str | None = None,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    recipe: dict[str, Any] | None = None,
    reporter: Reporter | None = None,
    trust_remote_code: bool = False,
) -> Artifact:
    """Quantize ``model`` with backend ``method`` into the artifact folder ``output``.

    Everything cheap is checked first (backend usable, options, output folder, model files, group
    sizes, calibration text); the folder appears only when complete, manifest included.
    A model folder with its own Python code (``auto_map``) is refused unless ``trust_remote_code``; when
    allowed, the manifest records it (``options._resolved.trust_remote_code``).
    """
    from llmopt.backends.base import QuantizeInputs, get_backend
    from llmopt.data import check_calibration_settings
    from llmopt.environment import environment
    from llmopt.placement import resolve_target
    from llmopt.source import has_tokenizer, load_tokenizer, resolve

    rep: Reporter = reporter or SilentReporter()
    out = Path(output)  # absolute and checked by @_guarded_output
    backend = get_backend(method)
    opts = backend.parse_options(options or {})
    if backend.wants_calibration(opts):
        check_calibration_settings(samples, seq_len)
    source = resolve(model, trust_remote_code=trust_remote_code)
    # a Hub id or a .gguf file resolves to a folder of its own (the Hub or llmopt cache): keep out of it too
    check_output(out, [*_input_paths(model, calibration, opts), source.path], overwrite=overwrite)
    target = resolve_target(device)
    dev = target.primary
    backend.validate(opts, source, dev)

    calib = None
    if calibration and not backend.wants_calibration(opts):
        raise InputError(*backend.unused_calibration(opts))  # never ignored in silence (the manifest has none)
    if backend.wants_calibration(opts) and not calibration:
        raise DataError(
            f"{method} needs calibration text.",
            "Pass --calibration FILE (.txt/.jsonl/.parquet) or a dataset name such as wikitext2.",
        )
    if source.path.is_dir() and not has_tokenizer(source.path):
        load_tokenizer(source.path)  # raises the clear error before any quantization work
    if calibration and backend.wants_calibration(opts):
        from llmopt.data import calibration_set

        tokenizer = load_tokenizer(source.path, trust_remote_code=trust_remote_code)
        calib = calibration_set(tokenizer, calibration, samples=samples, seq_len=seq_len, seed=seed)

    for stale in sweep_stale_partials(out):
        rep.info(f"removed {stale.name}, left by an interrupted run that no longer exists")
    staging = _staging_dir(out)
    try:
        start = time.perf_counter()
        extra = backend.quantize(
            QuantizeInputs(
                source=source,
                options=opts,
                calibration=calib,
                out_dir=staging,
                reporter=rep,
                device=dev,
                target=target,
            )
        )
        placement = extra.pop("placement", None) if isinstance(extra, dict) else None
        if trust_remote_code:
            extra = {**(extra or {}), "trust_remote_code": True}
        elapsed = time.perf_counter() - start
        interrupt.check()  # an interrupt swallowed inside the backend must not yield an artifact
        give_plain_modes(staging)
        with rep.step("hashing files and writing llmopt.json"):
            env = environment(dev)
            env["packages"].update(backend.library_versions())
            if placement is not None:
                env["placement"] = placement
            manifest = Manifest(
                llmopt_version=__version__,
                backend=backend.name,
                format=backend.format,
                runner=backend.runner,
                options={**opts.model_dump(mode="json"), **({"_resolved": extra} if extra else {})},
                source=SourceInfo(
                    model=model,
                    resolved_path=str(source.path.resolve()),
                    revision=source.revision,
                    weights_sha256=source.weights_sha256(),
                    architecture=source.architecture,
                    model_type=source.model_type,
                ),
                calibration=CalibrationInfo(**calib.manifest_record()) if calib else None,
                environment=EnvironmentInfo(**env),
                quantize_seconds=round(elapsed, 2),
                files=hash_tree(staging),
                recipe=recipe,
            )
            artifact = Artifact(staging, manifest)
            artifact.save()  # written last: its presence marks the folder complete
        interrupt.check()
        _swap_into_place(staging, out)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, Exception) and is_no_space(exc):
            raise no_space_error(exc, out) from None
        raise
    artifact.path = out
    return artifact


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def evaluate(
    artifact_path: str | Path,
    baseline: str,
    spec: EvalSpec | str,
    *,
    gate: GateSpec | None = None,
    use_cache: bool = True,
    write_manifest: bool = True,
    reporter: Reporter | None = None,
    trust_remote_code: bool = False,
    baseline_speeds: dict[str, dict[str, Any]] | None = None,
    tasks_unsupported: Literal["refuse", "record"] = "refuse",
    **settings: Any,
) -> EvalReport:
    """Perplexity of an artifact and of its FP16 baseline on the same token ids; gate; record.

    ``spec`` holds the evaluation settings (llmopt/specs.py), as a recipe or the CLI built them; a caller may
    instead give the dataset and the settings as keywords (``evaluate(art, base, "eval.txt", context_length=256)``).
    With ``spec.throughput``, also the serving speed of both, each measured in a process of its own
    (never cached on disk), under ``report.throughput`` (see llmopt/evaluate/throughput.py). A caller
    that evaluates several artifacts against one baseline in one sitting (``llmopt run``) passes the same
    ``baseline_speeds`` dict to every call: the baseline's speed is then measured once, by the first call, for
    each (model, settings, device), and the later variants are compared with that measurement.

    With ``spec.kld`` (the default), also how far the artifact's next-token distribution moves from FP16's on
    every scored token (KL divergence, top-1 agreement, Δp: ``report.artifact.distribution``,
    llmopt/evaluate/kld.py). FP16's side of it is kept on disk next to the baseline cache, so, like the
    baseline's perplexity, it is computed once for every artifact evaluated against it.

    With ``spec.tasks``, also lm-eval tasks on both models, each run on the model already loaded for scoring
    (``report.task_recovery``, llmopt/evaluate/tasks.py; the baseline's scores cached like its perplexity). An
    artifact whose runner holds no transformers model (GGUF) cannot run them: ``tasks_unsupported="refuse"``
    (``llmopt eval``) makes that bad input before any scoring, ``"record"`` (``llmopt run``) records
    "not for gguf" in ``artifact.tasks.not_run``, never a number.

    Returns the report (schema ``llmopt.eval/2``, documented in README.md). The report is also
    written into the artifact's manifest, together with the hash of the files it saw.
    """
    from llmopt.data import load_text
    from llmopt.environment import device_name, environment
    from llmopt.evaluate import baseline as baseline_cache
    from llmopt.evaluate.perplexity import make_windows, paired_delta, require_error_bar
    from llmopt.placement import resolve_target
    from llmopt.source import check_remote_code, load_tokenizer, resolve

    if isinstance(spec, str):
        spec = eval_spec(dataset=spec, **settings)
    elif settings:
        raise TypeError(f"evaluate() got settings beside a spec: {', '.join(settings)}; put them in the spec")
    check_settings(spec.context_length, spec.stride, spec.batch_size, add_bos=spec.add_bos, max_tokens=spec.max_tokens)
    if not spec.kld and gate is not None and gate.needs_distribution():
        raise InputError(
            "the gate reads the KL divergence (--max-kld / --min-top1), which --no-kld turns off.",
            "Drop --no-kld, or the KL divergence thresholds.",
        )
    if not spec.tasks and spec.task_limit is not None:
        raise InputError(
            "--task-limit picks the examples of --tasks, but no tasks were asked for.",
            "Pass --tasks NAME[,NAME] (recipe evaluation.tasks), or drop --task-limit.",
        )
    if not spec.tasks and gate is not None and gate.min_recovery is not None:
        raise InputError(
            "the gate reads task accuracy recovery (--min-recovery), but no tasks were asked for.",
            "Pass --tasks NAME[,NAME] (recipe evaluation.tasks), or drop --min-recovery.",
        )
    rep: Reporter = reporter or SilentReporter()
    art = Artifact.open(artifact_path, results_replaceable=write_manifest)
    if art.dropped_results:
        rep.info(f"the stored evaluation in {art.manifest_path} was damaged ({art.dropped_results}); it is replaced")
    if write_manifest and not os.access(art.path, os.W_OK | os.X_OK):
        # found now, not after the whole evaluation, when recording the result in the manifest would fail
        raise OutputPathError(
            f"the artifact folder {art.path} is not writable, so the evaluation cannot be recorded in its llmopt.json.",
            "Make the folder writable (or copy the artifact somewhere you can write) and run eval again.",
        )
    with rep.step("checking artifact hashes"):
        art.require_intact()
    check_remote_code(art.path, trust_remote_code, what="artifact")
    target = resolve_target(spec.device)
    ahead = contextlib.ExitStack()
    if spec.throughput is not None:
        from llmopt.evaluate.throughput import (
            check_speed_settings,
            measurement_processes_ahead,
            refuse_decompressed_speed,
        )

        refuse_decompressed_speed(art.path, target.spec)  # before any scoring: its speed cannot be measured here
        check_speed_settings(spec.throughput.resolved(target.primary), target.spec, art.path)
        # its process starts now, while this one scores: the measurement itself then starts at once
        ahead.enter_context(measurement_processes_ahead(target.spec, measurements=2))  # FP16's, the artifact's
    with ahead:
        task_plan, art_tasks = _task_plan(spec, art, tasks_unsupported, rep)
        base = resolve(baseline, trust_remote_code=trust_remote_code)
        text = load_text(spec.dataset)

        base_tok = load_tokenizer(base.path, trust_remote_code=trust_remote_code, what="baseline model folder")
        ids_all = _tokenize(base_tok, text)
        ids = ids_all[: spec.max_tokens] if spec.max_tokens else ids_all
        try:
            art_tok = load_tokenizer(art.path, trust_remote_code=trust_remote_code, what="artifact")
        except Exception as exc:
            raise TokenizerMismatchError(
                f"the artifact at {art.path} has no loadable tokenizer ({type(exc).__name__}).",
                "Re-create the artifact with `llmopt quantize`, which saves the tokenizer.",
            ) from None
        sample = text[:20000]
        if _tokenize(art_tok, sample) != _tokenize(base_tok, sample) or len(art_tok) != len(base_tok):
            raise TokenizerMismatchError(
                f"the artifact's tokenizer ({len(art_tok)} tokens) and the baseline's ({len(base_tok)} tokens) "
                "split the evaluation text differently, so their perplexities are not comparable.",
                "Use as --baseline the model the artifact was quantized from "
                f"(its manifest says: {art.manifest.source.model}).",
            )
        bos_id = base_tok.bos_token_id if spec.add_bos else None
        if spec.add_bos and bos_id is None:
            raise InputError("--add-bos was given but the tokenizer has no BOS token.", "Leave out --add-bos.")
        windows = make_windows(ids, spec.context_length, spec.resolved_stride(), bos_id=bos_id)
        require_error_bar(windows, len(ids), spec.context_length, spec.resolved_stride(), add_bos=spec.add_bos)
        windows_tokens = [len(w.ids) - w.score_from for w in windows]
        dev = target.primary

        measured = EvalSettings.of(
            spec,
            text_sha256=sha256_json(text),
            tokens_sha256=sha256_json(ids),
            tokens_total=len(ids),
            tokens_scored=sum(windows_tokens),
            windows=len(windows),
            device=device_name(dev),
            placement=target.describe(),
        )

        env = environment(dev)
        key_parts: dict[str, Any] = {
            "weights": base.weights_sha256(),
            "settings": measured.model_dump(
                mode="json", include={"tokens_sha256", "context_length", "stride", "add_bos"}
            ),
            "device": measured.device,
            "versions": {k: env["packages"].get(k) for k in ("torch", "transformers")},
        }
        if target.multi_gpu:
            # Keys of one-device results stay as they were; a possible split is cached apart from them.
            key_parts["placement"] = {"spec": target.spec, "devices": device_name(target.spec)}
        key = baseline_cache.cache_key(key_parts)
        with contextlib.ExitStack() as stack:
            reference = None
            ref_folder = None
            if spec.kld:
                from llmopt.evaluate import kld as kld_mod

                ref_folder = stack.enter_context(kld_mod.reference_folder(key, use_cache))
                reference = kld_mod.load_reference(ref_folder, windows_tokens, key)
            base_tasks: TasksReport | None = None
            task_key = None
            if task_plan is not None:
                task_key = baseline_cache.cache_key({**key_parts, "tasks": task_plan.identity()})
                stored = baseline_cache.load_cached_tasks(task_key) if use_cache else None
                if stored is not None:
                    base_tasks = TasksReport.model_validate(stored["tasks"])
                    base_tasks.cached = True
                    rep.info("FP16 baseline task scores from cache")
            cached = baseline_cache.load_cached(key) if use_cache else None
            if cached is not None and (not spec.kld or reference is not None):
                base_result = ModelScore.model_validate(cached["result"])
                base_result.cached = True
                # the cache is keyed by the weights, not the path: the same model from another folder (a copy, a
                # cut made again) hit the entry and reported, and stored, the folder that wrote it, so `llmopt run`
                # never reused such an evaluation ("baseline changed")
                base_result.model = baseline
                rep.info(f"FP16 baseline from cache (perplexity {base_result.perplexity:.4f})")
                if task_plan is not None and base_tasks is None:
                    base_tasks = _tasks_alone(
                        base.path, target.spec, task_plan, spec.batch_size, rep, trust_remote_code
                    )
            else:
                base_result, reference = _score_model(
                    "hf",
                    base.path,
                    windows,
                    target.spec,
                    spec.batch_size,
                    spec.kernel,
                    rep,
                    "FP16 baseline",
                    trust_remote_code,
                    build_reference=(ref_folder, key) if ref_folder is not None else None,
                    tasks=task_plan if base_tasks is None else None,
                )
                if base_result.tasks is not None:
                    base_tasks = base_result.tasks
                base_result.size_bytes = base.size_bytes()
                base_result.model = baseline
                if use_cache:
                    stored_score = base_result.model_copy(update={"tasks": None})  # task scores are cached apart
                    problem = baseline_cache.store(key, {"result": stored_score.to_json()})
                    if problem:
                        rep.info(f"warning: {problem}")
                base_result.cached = False
            if base_tasks is not None and not base_tasks.cached:
                base_tasks.cached = False
                if use_cache and task_key is not None:
                    problem = baseline_cache.store(task_key, {"tasks": base_tasks.to_json()})
                    if problem:
                        rep.info(f"warning: {problem}")
            base_result.tasks = base_tasks

            art_result, _ = _score_model(
                art.manifest.runner,
                art.path,
                windows,
                target.spec,
                spec.batch_size,
                spec.kernel,
                rep,
                f"artifact ({art.manifest.backend})",
                trust_remote_code,
                against=reference,
                tasks=task_plan,
            )
        if art_tasks is not None:
            art_result.tasks = art_tasks
        art_result.size_bytes = art.size_bytes()
        art_result.path = str(art.path)
        art_result.backend = art.manifest.backend
        art_result.format = art.manifest.format
        # The artifact's dtype heads the report; each side keeps what it really computed in (``dtype``, and
        # ``compute`` where one dtype does not say it all, e.g. bitsandbytes), since the two can differ.
        measured.dtype = art_result.dtype

        assert art_result.window_nll is not None and base_result.window_nll is not None
        delta_pct, delta_stderr = paired_delta(art_result.window_nll, base_result.window_nll, windows_tokens)
        report = EvalReport(
            settings=measured,
            baseline=base_result,
            artifact=art_result,
            delta_pct=delta_pct,
            delta_pct_stderr=delta_stderr,
            size_ratio=art_result.size_bytes / base_result.size_bytes if base_result.size_bytes else None,
            environment=env,
            artifact_files_sha256=files_digest(art.manifest.files),
        )
        if base_tasks is not None and art_result.tasks is not None:
            from llmopt.evaluate.tasks import compare

            report.task_recovery = compare(base_tasks, art_result.tasks)
        if spec.throughput is not None:
            try:
                report.throughput = _measure_speed(
                    spec, art, base.path, target.spec, dev, rep, trust_remote_code, baseline_speeds
                )
            except BaseException as exc:
                if not (isinstance(exc, KeyboardInterrupt | InterruptedRunError) or interrupt.requested()):
                    if isinstance(exc, LlmoptError):
                        # a failed measurement (its process crashed, the kernel is missing): the scores are whole
                        # and worth showing, the evaluation is not (llmopt run's report shows them, not gated)
                        exc.partial = report
                    raise
                # The scores are whole, the evaluation is not: nothing goes into the manifest (a later evaluation
                # must not reuse it as complete), but the caller may show what was measured (llmopt run's report).
                stopped = InterruptedRunError(
                    "interrupted while measuring speed: the perplexity"
                    + (" and KL divergence" if spec.kld else "")
                    + " measured before it are not recorded in llmopt.json (an evaluation without its speed is not "
                    "whole).",
                    "Run the command again to redo the evaluation (the FP16 baseline's scores are cached).",
                )
                stopped.partial = report
                raise stopped from None
        report.gate = apply_gate(gate or GateSpec(), report)

        if write_manifest:
            art.manifest.evaluation = report.without_gate()
            art.manifest.gate = report.gate
            art.save()
        return report


def _measure_speed(
    spec: EvalSpec,
    art: Artifact,
    base_path: Path,
    device_spec: str,
    dev: str,
    rep: Reporter,
    trust_remote_code: bool,
    baseline_speeds: dict[str, dict[str, Any]] | None,
) -> SpeedReport:
    """Serving speed of the baseline (or its earlier measurement in this run) and of the artifact."""
    from llmopt.evaluate.throughput import bench_model, throughput_section

    assert spec.throughput is not None
    speed = spec.throughput.resolved(dev)
    speed_key = sha256_json(
        {"model": str(base_path.resolve()), "settings": speed.model_dump(mode="json"), "device": device_spec}
    )
    if baseline_speeds is not None and speed_key in baseline_speeds:
        base_speed = copy.deepcopy(baseline_speeds[speed_key])
        rep.info("FP16 baseline speed measured earlier in this run: not measured again")
    else:
        base_speed = bench_model(
            base_path,
            device_spec,
            speed,
            runner_kind="hf",
            label="FP16 baseline",
            reporter=rep,
            trust_remote_code=trust_remote_code,
        )
        if baseline_speeds is not None:
            baseline_speeds[speed_key] = base_speed
    art_speed = bench_model(
        art.path,
        device_spec,
        speed,
        runner_kind=art.manifest.runner,
        kernel=spec.kernel,
        # its progress lines and errors name it as the scoring does (they said "model": "the speed measurement of
        # model was killed by SIGKILL" in a run's report)
        label=f"artifact ({art.manifest.backend})",
        reporter=rep,
        trust_remote_code=trust_remote_code,
    )
    return SpeedReport.model_validate(throughput_section(base_speed, art_speed, speed, dev))


def _task_plan(
    spec: EvalSpec, art: Artifact, unsupported: str, rep: Reporter
) -> tuple[TaskPlan | None, TasksReport | None]:
    """The checked tasks to run (None: none asked for, or the artifact cannot run them) and, for an artifact that
    cannot, the record saying so. Checked before any model is loaded."""
    if not spec.tasks:
        return None, None
    from llmopt.runners.base import runner_class

    runner = art.manifest.runner
    if not runner_class(runner).runs_tasks:
        why = (
            f"not for {art.manifest.format}: lm-eval tasks run on a transformers model, and the '{runner}' runner "
            "that loads this artifact holds none"
        )
        if unsupported == "refuse":
            raise InputError(
                f"--tasks cannot run on {art.path}: {why}.",
                "Evaluate it without --tasks (perplexity and KL divergence work on every format), or run the tasks "
                "on a transformers-format artifact (GPTQ, AWQ, bitsandbytes, llm-compressor).",
            )
        return None, TasksReport(requested=list(spec.tasks), limit=spec.task_limit, not_run=why)
    from llmopt.evaluate.tasks import plan_tasks

    with rep.step(f"checking tasks {', '.join(spec.tasks)}"):
        return plan_tasks(list(spec.tasks), spec.task_limit), None


def _tasks_alone(
    path: Path, device: str, plan: TaskPlan, batch_size: int, reporter: Reporter, trust_remote_code: bool
) -> TasksReport:
    """The baseline's task scores when its perplexity came from the cache and its task scores did not."""
    from llmopt.evaluate.tasks import run_tasks
    from llmopt.runners import load_runner

    with reporter.step("loading FP16 baseline (tasks)"):
        runner = load_runner("hf", path, device, trust_remote_code=trust_remote_code)
    try:
        with reporter.step(f"lm-eval tasks of FP16 baseline ({', '.join(plan.names)})"):
            return run_tasks(runner.causal_lm(), path, plan, batch_size, trust_remote_code=trust_remote_code)
    finally:
        runner.close()


def _score_model(
    runner_kind: str,
    path: Path,
    windows: list[Any],
    device: str,
    batch_size: int,
    kernel: str | None,
    reporter: Reporter,
    label: str,
    trust_remote_code: bool = False,
    *,
    build_reference: tuple[Path, str] | None = None,
    against: Any = None,
    tasks: TaskPlan | None = None,
) -> tuple[ModelScore, Any]:
    """Load and score one model. ``build_reference`` (folder, key): also write FP16's side of the KL divergence
    there, in the same pass. ``against`` (a kld.Reference): also score the distribution against it, in the
    same pass (``distribution``). ``tasks``: also run these lm-eval tasks on the loaded model (``tasks``).
    Returns the score and the reference written (or None)."""
    from llmopt.evaluate import kld
    from llmopt.evaluate.perplexity import score
    from llmopt.results import Distribution
    from llmopt.runners import load_runner

    with reporter.step(f"loading {label}"):
        runner = load_runner(runner_kind, path, device, kernel=kernel, trust_remote_code=trust_remote_code)
    try:
        reference = None
        distribution = None
        start = time.perf_counter()
        what = "perplexity" if build_reference is None and against is None else "perplexity and token distribution"
        with reporter.step(f"{what} of {label} ({len(windows)} windows)", total=len(windows)) as step:
            tokens = [len(w.ids) - w.score_from for w in windows]
            if build_reference is not None:
                folder, key = build_reference
                writer = kld.ReferenceWriter(folder, key, tokens, runner.n_vocab)
                result, reference = kld.build_reference(
                    windows, runner.kld_reference, runner.n_vocab, writer, batch_size=batch_size, on_batch=step.advance
                )
            elif against is not None:
                kld.check_vocab(against.vocab, runner.n_vocab)
                result, dist = kld.score_against(
                    windows, runner.kld_compare, against, batch_size=batch_size, on_batch=step.advance
                )
                distribution = Distribution.model_validate(dist)
            else:
                result = score(windows, runner.nll, batch_size=batch_size, on_batch=step.advance)
        elapsed = time.perf_counter() - start
        scored = ModelScore(
            **result.to_dict(),
            footprint_bytes=runner.footprint_bytes(),
            load_seconds=round(runner.load_seconds, 3),
            eval_seconds=round(elapsed, 3),
            runner=runner.name,
            dtype=runner.dtype,
            kernel=runner.kernel or None,
            compute=runner.compute or None,
            placement=runner.placement.record() if runner.placement is not None else None,
            distribution=distribution,
        )
        if tasks is not None:
            from llmopt.evaluate.tasks import run_tasks

            with reporter.step(f"lm-eval tasks of {label} ({', '.join(tasks.names)})"):
                scored.tasks = run_tasks(
                    runner.causal_lm(), path, tasks, batch_size, trust_remote_code=trust_remote_code
                )
        return scored, reference
    finally:
        runner.close()
