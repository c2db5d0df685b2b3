"""``llmopt run``: every variant of a recipe through quantize -> evaluate -> gate (-> publish).

Resumable: a variant whose artifact already exists, was built from the same source, method, options
and calibration, and whose files still match their hashes, is not quantized again; one already
evaluated with the same settings (same text, tokens, window, device, library versions) is not scored
again, but its gate is re-applied with the recipe's current thresholds. A variant that fails is recorded
with its error and the run goes on with the next one; an interrupt (Ctrl-C, SIGTERM) stops the whole run.
``report.json``/``report.md`` are rewritten after every variant, so a run killed at any point leaves a
report of what finished, the rest marked ``not_run``. The FP16 baseline is scored once: ``api.evaluate``
caches it.

Exit code of a run (``RunReport.exit_code``): 0 when every variant passed its gate; otherwise, if any
variant errored, the exit code of the first such error in recipe order (2 bad input, 4 backend or
service unavailable, 5 artifact mismatch, 1 unexpected error); otherwise 3 (a gate failed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmopt import interrupt
from llmopt.artifact import MANIFEST_NAME, Artifact, Manifest, files_digest, sha256_json
from llmopt.errors import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    InterruptedRunError,
    LlmoptError,
    NewerArtifactError,
    RecipeError,
)
from llmopt.evaluate.gate import apply_gate
from llmopt.outputs import (
    ARTIFACTS_DIR,
    check_run_folder,
    claim_run_folder,
    make_parents,
    output_lock,
    remove_empty,
)
from llmopt.progress import Reporter, SilentReporter
from llmopt.recipe import Recipe, VariantSpec, apply_overrides, load_recipe, parse_set_flags
from llmopt.results import (
    EVAL_SCHEMAS_READ,
    EvalReport,
    QuantizeOutcome,
    RunReport,
    RunState,
    ServingReport,
    VariantError,
    VariantOutcome,
)
from llmopt.specs import CalibrationSpec, GateSpec

# Written into every run folder llmopt creates: a later run may write there without --overwrite.
# What a run writes at the top of its folder (older runs wrote no marker: a folder holding only these is ours).


class _Context:
    """What every variant of one run shares: the recipe, the output folder, hashes computed once."""

    def __init__(self, recipe: Recipe, recipe_file: str | None, out: Path, reporter: Reporter) -> None:
        self.recipe = recipe
        self.recipe_file = recipe_file
        self.out = out
        self.reporter = reporter
        self.model_arg = recipe.model.source  # what api.quantize/evaluate get as the model
        self.source_weights: dict[str, str] = {}
        self.eval_text_sha256 = ""
        self.calib_text_sha256: str | None = None
        self.device = ""
        self.device_spec = ""  # the whole device, e.g. cuda:0,1 for a model split over GPUs
        self.device_label = ""
        self.placement_label = ""  # DeviceTarget.describe(): which GPUs a model may be split over
        self.multi_gpu = False
        self.versions: dict[str, str | None] = {}
        self.org: str | None = None
        self.baseline_speeds: dict[str, dict[str, Any]] = {}  # the FP16 speed, measured once per run
        self.baseline_serving: ServingReport | None = None  # the FP16 model served, once per run
        self.baseline_serving_tried = False
        self.notes: list[str] = []  # for the run report (a baseline that could not be served, ...)
        # the speed measurement's process started ahead (llmopt/evaluate/bench_process.py), for the whole run
        self.ahead = contextlib.ExitStack()
        self.overwrite = False  # --overwrite: also replace a variant's artifact folder that cannot be reused
        self.replace_artifacts: set[str] = set()  # the variants whose artifact folder is replaced as a whole
        self.interrupted: VariantOutcome | None = None  # the variant an interrupt stopped, with what it finished

    def record(self, variant: VariantSpec) -> dict[str, Any]:
        """What goes into the artifact manifest's ``recipe`` field."""
        return {
            "variant": variant.name,
            "file": self.recipe_file,
            "resolved": self.recipe.resolved(),
        }


def run_recipe(
    recipe: Recipe | str | Path,
    *,
    only: list[str] | None = None,
    output: str | Path | None = None,
    publish: bool = False,
    overwrite: bool = False,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    reporter: Reporter | None = None,
) -> RunReport:
    """Run the recipe's variants (all, or those named in ``only``) and write the report.

    Returns the run report (schema ``llmopt.run/1``), also written as ``report.json``, ``report.md``
    and PNG plots into the output folder. Problems shared by every variant (missing model or text, no
    Hub token when publishing, too little calibration text or disk space, an output folder with someone
    else's files) raise before any work; a variant's own failure is recorded in the report. The report
    files are rewritten after each variant; an interrupt writes them (the rest ``not_run``) and raises
    ``InterruptedRunError``.
    """
    rep = reporter if reporter is not None else SilentReporter()
    recipe, recipe_file = resolve_recipe(recipe, overrides, sets)
    selected = _select(recipe, only)
    out = Path(output or recipe.output or Path("llmopt-runs") / (recipe.name or "recipe")).expanduser()
    check_run_folder(out, overwrite)
    # One run at a time in a folder: a second `llmopt run -o SAME` went on beside the first, and the last one
    # to write report.json won (a hostile tester's finding).
    created = make_parents(out.parent)
    try:
        with output_lock(out):
            check_run_folder(out, overwrite)  # again: no other run can change it now
            return _run_locked(recipe, recipe_file, selected, out, publish, rep, overwrite)
    except BaseException:
        remove_empty(created)
        raise


def resolve_recipe(
    recipe: Recipe | str | Path, overrides: dict[str, Any] | None = None, sets: list[str] | None = None
) -> tuple[Recipe, str | None]:
    """The recipe as a run runs it (loaded if a path, overrides applied) and its file (None if given loaded)."""
    # typed flags (None = not given), then --set key.path=value (null clears a key), validated together: a flag
    # may need what a --set adds (--slo and --set evaluation.serving.rates=[...]); a file's recipe is validated
    # once, with them applied, so that a flag can fix a value the file has wrong
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged = {**given, **parse_set_flags(sets)}
    if not isinstance(recipe, Recipe):
        return load_recipe(recipe, merged), str(recipe)
    return apply_overrides(recipe, merged, keep_none=True), None


def _run_locked(
    recipe: Recipe,
    recipe_file: str | None,
    selected: list[VariantSpec],
    out: Path,
    publish: bool,
    rep: Reporter,
    overwrite: bool = False,
) -> RunReport:
    ctx = _Context(recipe, recipe_file, out, rep)
    ctx.overwrite = overwrite
    with ctx.ahead:
        return _run_prepared(ctx, selected, out, publish, rep)


def _run_prepared(
    ctx: _Context,
    selected: list[VariantSpec],
    out: Path,
    publish: bool,
    rep: Reporter,
) -> RunReport:
    recipe, recipe_file = ctx.recipe, ctx.recipe_file
    started = time.perf_counter()
    _prepare(ctx, selected, publish)
    claim_run_folder(out)

    from llmopt.report import build_run_report, write_report

    record = {"name": recipe.name, "file": recipe_file, "resolved": recipe.resolved()}

    def report_of(outcomes: list[VariantOutcome], state: RunState) -> RunReport:
        rest = [not_run_outcome(v) for v in selected[len(outcomes) :]]
        report = build_run_report(
            recipe=record,
            variants=[*outcomes, *rest],
            output=out,
            seconds=time.perf_counter() - started,
            notes=ctx.notes,
        )
        report.baseline_serving = ctx.baseline_serving
        report.state = state
        if state == "interrupted":
            report.exit_code = EXIT_INTERRUPTED
        elif state == "running":
            report.exit_code = None
        return report

    outcomes: list[VariantOutcome] = []
    # A report from an earlier run must not pass for this one's while it runs.
    write_report(report_of(outcomes, "running"), out, plots=False)
    try:
        for i, variant in enumerate(selected, 1):
            interrupt.check()
            rep.info(f"[{i}/{len(selected)}] {variant.name} ({variant.method})")
            outcomes.append(_run_variant(ctx, variant, publish))
            interrupt.check()
            if i < len(selected):
                write_report(report_of(outcomes, "running"), out, plots=False)
        if publish and _one_gguf_repo(recipe):
            _publish_gguf_repo(ctx, outcomes)
    except (KeyboardInterrupt, InterruptedRunError):
        done = len(outcomes)
        if ctx.interrupted is not None:
            outcomes.append(ctx.interrupted)  # not finished (not_run), but with the scores it has
        written = write_report(report_of(outcomes, "interrupted"), out, plots=False)
        current = selected[done].name if done < len(selected) else None
        stopped = InterruptedRunError(
            f"interrupted{f' during {current}' if current else ''}: {done} of {len(selected)} variant(s) "
            f"finished and are in {out / 'report.json'}; nothing half-written was left.",
            "Run the same command again: finished variants are reused, the rest run.",
        )
        stopped.partial = written  # the report as written (state interrupted), for --json
        raise stopped from None
    report = report_of(outcomes, "complete")
    write_report(report, out)
    return report


def not_run_outcome(variant: VariantSpec) -> VariantOutcome:
    """A report row for a variant the run did not get to (interrupted or killed before it)."""
    return VariantOutcome(
        name=variant.name, method=variant.method, status="not_run", artifact=f"{ARTIFACTS_DIR}/{variant.name}"
    )


def _select(recipe: Recipe, only: list[str] | None) -> list[VariantSpec]:
    if not only:
        return list(recipe.variants)
    wanted = {recipe.variant(name).name for name in only}  # raises, naming the variants, on a typo
    return [v for v in recipe.variants if v.name in wanted]


def _prepare(ctx: _Context, selected: list[VariantSpec], publish: bool) -> None:
    """Checks that would fail every variant the same way, done once and before any heavy work."""
    from llmopt.data import load_text
    from llmopt.environment import device_name, package_versions
    from llmopt.placement import resolve_target
    from llmopt.source import resolve

    recipe, reporter = ctx.recipe, ctx.reporter
    if publish:
        from llmopt import hub

        ctx.org = hub.ensure_ready(recipe.publish.organization if recipe.publish else None)
    with reporter.step("checking the model and the texts"):
        with _read_from_here(ctx, "model.source", recipe.model.source):
            source = resolve(
                recipe.model.source, recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
            )
        if recipe.model.revision is not None:
            # api.quantize/evaluate take a model spec without a revision: hand them the snapshot folder of
            # that revision; the Hub id and revision stay recorded in the manifest's recipe record.
            ctx.model_arg = str(source.path)
        ctx.source_weights = source.weights_sha256()
        with _read_from_here(ctx, "evaluation.dataset", recipe.evaluation.dataset):
            eval_text = load_text(recipe.evaluation.dataset)
        ctx.eval_text_sha256 = sha256_json(eval_text)
        if recipe.calibration.dataset and any(v.needs_calibration() for v in selected):
            with _read_from_here(ctx, "calibration.dataset", recipe.calibration.dataset):
                text = load_text(recipe.calibration.dataset, purpose="calibration")
            ctx.calib_text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        target = resolve_target(recipe.evaluation.device)
        ctx.device = target.primary
        ctx.device_spec = target.spec
        ctx.device_label = device_name(ctx.device)
        ctx.placement_label = target.describe()
        ctx.multi_gpu = target.multi_gpu
        ctx.versions = {k: package_versions((k,)).get(k) for k in ("torch", "transformers")}
    _check_output_outside_inputs(ctx, selected, source.path)
    _check_artifact_folders(ctx, selected)
    from llmopt.evaluate.perplexity import check_settings

    ev = recipe.evaluation
    check_settings(ev.context_length, ev.stride, ev.batch_size, add_bos=ev.add_bos, max_tokens=ev.max_tokens)
    if ev.serving is not None and ev.serving.prompts_file:
        with _read_from_here(ctx, "evaluation.serving.prompts_file", ev.serving.prompts_file):
            _check_prompts_file(ev.serving.prompts_file)
    if ev.throughput is not None and ctx.device:
        from llmopt.evaluate.throughput import check_speed_settings, measurement_processes_ahead

        check_speed_settings(ev.throughput.resolved(ctx.device), ctx.device_spec or ctx.device, source.path)
        # the first measurement's process imports and sets up CUDA while the checks below and the first
        # variants run; at most FP16's and one per variant, so none is started after the last
        ctx.ahead.enter_context(
            measurement_processes_ahead(ctx.device_spec or ctx.device, measurements=1 + len(selected))
        )
    with reporter.step("checking the evaluation text's windows"):
        _check_eval_windows(ctx, source.path, eval_text)
    _check_backends(selected)
    if ev.tasks:
        from llmopt.evaluate.tasks import is_local_task, plan_tasks

        with reporter.step(f"checking tasks {', '.join(ev.tasks)}"):
            local = [t for t in ev.tasks if is_local_task(t)]
            with _read_from_here(ctx, "evaluation.tasks", *local):
                plan = plan_tasks(list(ev.tasks), ev.task_limit)  # an unknown task or a broken file: before any work
        mapped = sorted(recipe.publish.benchmarks) if publish and recipe.publish else []
        missing = [t for t in mapped if t not in plan.names]
        if missing:  # found after all the work, at publish time, it would fail every passing variant
            raise RecipeError(
                f"publish.benchmarks maps {', '.join(missing)}, which evaluation.tasks does not run "
                f"(it runs: {', '.join(plan.names)}).",
                "Map tasks that evaluation.tasks runs (a group stands for its tasks), or add the task there.",
            )
    if recipe.calibration.dataset and any(v.needs_calibration() for v in selected):
        with reporter.step("checking the calibration text"):
            _check_calibration(ctx, source.path)
    _check_space(ctx, selected, source.path)


@contextlib.contextmanager
def _read_from_here(ctx: _Context, key: str, *specs: str) -> Iterator[None]:
    """An error about a relative path of the recipe that is not there says where it was looked for: in the current
    folder, not the recipe's (and, when the recipe's folder holds it, says so)."""
    try:
        yield
    except InterruptedRunError:
        raise
    except LlmoptError as exc:
        note = _relative_note(ctx, key, [s for s in specs if s])
        if note is None:
            raise
        raise type(exc)(f"{exc.message.rstrip('.')} ({note}).", exc.hint) from None


def _relative_note(ctx: _Context, key: str, specs: list[str]) -> str | None:
    from llmopt.data import NAMED_DATASETS
    from llmopt.outputs import absolute

    for spec in specs:
        if spec in NAMED_DATASETS or Path(spec).expanduser().is_absolute():
            continue
        tried = absolute(spec)
        if tried.exists():
            continue
        note = (
            f"{key} {spec} is a relative path, and relative paths in a recipe are read from the current folder "
            f"({Path.cwd()}), not from the recipe's folder: tried {tried}"
        )
        if ctx.recipe_file:
            folder = absolute(Path(ctx.recipe_file).expanduser().parent)
            if (folder / spec).exists():
                note += (
                    f"; it is in the recipe's folder, {folder / spec}: run llmopt from {folder}, or write the path "
                    "absolute (or from a ${VAR})"
                )
        return note
    return None


def recipe_inputs(
    recipe: Recipe, recipe_file: str | None, selected: list[VariantSpec], model_path: Path | None = None
) -> list[tuple[str, str | Path]]:
    """(what, path) of every file a run of ``recipe`` reads that may be the user's own: names and Hub ids are among
    them, and are skipped by the callers since nothing exists at their path."""
    from llmopt.evaluate.tasks import is_local_task

    ev = recipe.evaluation
    found: list[tuple[str, str | Path | None]] = [
        ("model.source", model_path),
        ("model.source", recipe.model.source),
        ("evaluation.dataset", ev.dataset),
        ("calibration.dataset", recipe.calibration.dataset),
        ("evaluation.serving.prompts_file", ev.serving.prompts_file if ev.serving else None),
        ("the recipe", recipe_file),
    ]
    found += [("evaluation.tasks", t) for t in ev.tasks or [] if is_local_task(t)]
    for v in selected:
        imatrix = v.options.get("imatrix")
        if isinstance(imatrix, str) and imatrix not in ("none", "auto"):
            found.append((f"variant '{v.name}' options.imatrix", imatrix))
    return [(what, spec) for what, spec in found if spec]


def _run_writes(ctx: _Context, selected: list[VariantSpec], rel: Path) -> str | None:
    """What the run does to a path ``rel`` inside its folder, if anything: it writes (or replaces) only its own
    names there (outputs.check_run_folder)."""
    from llmopt.outputs import RUN_MARKER

    if not rel.parts:
        return "is the run folder"
    top = rel.parts[0].casefold()
    if (len(rel.parts) == 1 and top in ("report.json", "report.md", RUN_MARKER.casefold())) or top.startswith(
        ".report."
    ):
        return f"would be overwritten by the run's {rel.parts[0]}"
    if top == "plots":
        return "is in plots/, where the run writes its plots"
    if top == SERVING_DIR:
        return f"is in {SERVING_DIR}/, where the run keeps its servers' logs and measurements"
    if top == ARTIFACTS_DIR and len(rel.parts) > 1:
        # case-folded: on a case-insensitive file system artifacts/Int8 is artifacts/int8
        named = {v.name.casefold(): v.name for v in selected}
        if rel.parts[1].casefold() in named:
            return f"is in {ARTIFACTS_DIR}/{named[rel.parts[1].casefold()]}, the artifact folder the run replaces"
    return None


def _check_output_outside_inputs(ctx: _Context, selected: list[VariantSpec], model_path: Path) -> None:
    """The run folder is neither an input (model folder, texts, prompts, task files) nor inside one, and no input is
    among the names the run writes in its folder (report files, plots/, serving/, its variants' artifact folders):
    checked before the run writes anything there, --overwrite or not."""
    from llmopt.errors import OutputPathError
    from llmopt.outputs import absolute

    out = absolute(ctx.out).resolve()
    # where the run's own folders really are: a link on the way (artifacts/ -> another folder) leads elsewhere, and
    # an input there was deleted with an artifact folder that --overwrite replaced (report files are replaced as
    # files: a link there is replaced, not what it points to)
    own = ["plots", SERVING_DIR, *(f"{ARTIFACTS_DIR}/{v.name}" for v in selected)]
    targets = [(Path(rel), (out / rel).resolve()) for rel in own]
    for what, spec in recipe_inputs(ctx.recipe, ctx.recipe_file, selected, model_path):
        path = absolute(spec)
        if not path.exists():
            continue
        real = path.resolve()
        if out == real or real in out.parents:
            where = "is" if out == real else "is inside"
            raise OutputPathError(
                f"the output folder {ctx.out} {where} the input {spec}: the run would write its reports and "
                "artifacts among its files.",
                "Choose an --output folder outside the model folder and the texts, e.g. llmopt-runs/NAME.",
            )
        fate = _run_writes(ctx, selected, real.relative_to(out)) if out in real.parents else None
        for rel, target in targets:
            if fate is None and (real == target or target in real.parents) and target.parent != out:
                fate = f"{_run_writes(ctx, selected, rel)} (through a link, at {target})"
        if fate is not None:
            raise OutputPathError(
                f"the input {spec} ({what}) {fate}: a run in {ctx.out} would overwrite or delete it.",
                f"Move {spec} out of {ctx.out}, or choose another --output folder.",
            )


def _check_artifact_folders(ctx: _Context, selected: list[VariantSpec]) -> None:
    """A variant's artifact folder from an earlier run that can be neither reused nor replaced (its llmopt.json edited
    into invalid JSON or damaged, files added beside the artifact's): found before the first variant, not when that
    variant's turn comes after the others ran. With --overwrite such a folder is replaced when its variant runs."""
    from llmopt.errors import ArtifactError
    from llmopt.outputs import unreplaceable_artifact

    problems: list[tuple[VariantSpec, Path, str]] = []
    for v in selected:
        folder = ctx.out / ARTIFACTS_DIR / v.name
        if not (folder / MANIFEST_NAME).is_file():
            continue  # no artifact (or an unfinished one without its manifest): the variant's quantize decides
        why = unreplaceable_artifact(folder)
        if why is not None:
            problems.append((v, folder, why))
    if not problems:
        return
    if ctx.overwrite:
        for v, folder, why in problems:
            ctx.reporter.info(f"{v.name}: {folder} {why}: --overwrite replaces it")
            ctx.replace_artifacts.add(v.name)
        return
    said = "; ".join(f"variant '{v.name}': {folder} {why}" for v, folder, why in problems)
    folders = " ".join(str(folder) for _, folder, _ in problems)
    raise ArtifactError(
        f"{said}. The run can neither reuse such an artifact folder nor replace it on its own.",
        f"Pass --overwrite to quantize {'it' if len(problems) == 1 else 'them'} again (the folder is replaced as a "
        f"whole), or delete it yourself (rm -r {folders}) and run again.",
    )


def _check_backends(selected: list[VariantSpec]) -> None:
    """Every selected variant's backend library is installed (else exit 4 naming them all, before any work)."""
    from llmopt.backends import get_backend

    problems: list[str] = []
    for v in selected:
        try:
            get_backend(v.method, require_usable=True)
        except LlmoptError as exc:
            problems.append(f"{v.name}: {exc.message}")
    if problems:
        from llmopt.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "not every variant can run here: " + "; ".join(problems),
            "Install what is named above (see `llmopt backends`), or leave those variants out with --only.",
        )


def _check_eval_windows(ctx: _Context, model_path: Path, text: str) -> None:
    """The evaluation text makes two or more scoring windows (one has no error bar): found here, not after the
    first variant is quantized (api.evaluate cuts the same windows from the same tokens)."""
    from llmopt.evaluate.perplexity import make_windows, require_error_bar
    from llmopt.source import has_tokenizer, load_tokenizer

    if not has_tokenizer(model_path):
        return  # each variant stops with the tokenizer's own clear error (source.load_tokenizer)
    ev = ctx.recipe.evaluation
    tokenizer = load_tokenizer(model_path, trust_remote_code=ctx.recipe.model.trust_remote_code)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[: ev.max_tokens or None]
    bos = 0 if ev.add_bos else None  # only the count matters here; api.evaluate checks the tokenizer has a BOS
    windows = make_windows(ids, ev.context_length, ev.resolved_stride(), bos_id=bos)
    require_error_bar(windows, len(ids), ev.context_length, ev.resolved_stride(), add_bos=ev.add_bos)


def _check_prompts_file(path: str) -> None:
    """``evaluation.serving.prompts_file`` exists, is readable and holds prompts: found here, not when the first
    variant is served after it was quantized and evaluated."""
    from llmopt.errors import DataError
    from llmopt.serving.trace import read_prompts

    try:
        read_prompts(path)
    except DataError as exc:
        raise DataError(
            f"evaluation.serving.prompts_file: {exc.message}",
            f"{exc.hint} Fix the file, or point evaluation.serving.prompts_file at another one (or drop the key "
            "for generated prompts).",
        ) from None


def _check_calibration(ctx: _Context, model_path: Path) -> None:
    """The calibration text holds ``samples`` slices of ``seq_len`` tokens (checked once, not per variant)."""
    from llmopt.data import calibration_set
    from llmopt.source import has_tokenizer, load_tokenizer

    cal = ctx.recipe.calibration
    assert cal.dataset is not None
    if not has_tokenizer(model_path):
        return  # each variant stops with the tokenizer's own clear error (source.load_tokenizer)
    tokenizer = load_tokenizer(model_path, trust_remote_code=ctx.recipe.model.trust_remote_code)
    calibration_set(tokenizer, cal.dataset, samples=cal.samples, seq_len=cal.seq_len, seed=cal.seed)


def artifact_bytes_bound(method: str, options: dict[str, Any], config: dict[str, Any]) -> int:
    """An upper bound on an artifact's size on disk, from the model's config (estimate.py's tensor shapes).

    Quantized linears at the method's bits plus per-group scales and zeros; everything else (embeddings,
    head, norms) counted at 16 bits, as the backends keep it; 5% and 16 MB on top for files and headers.
    A format this cannot size counts as the fp16 model (none of the backends writes more).
    """
    from llmopt.estimate import _GGUF_BPW, architecture_from_config, tensors

    arch = architecture_from_config(config)
    linear = sum(g.numel for g in tensors(arch) if g.role == "linear")
    other = sum(g.numel for g in tensors(arch) if g.role != "linear")
    group = int(options.get("group_size") or 128)
    per = 1.0 / group if group > 0 else 0.0
    head_bytes = 0.0
    if method == "gptq" and options.get("quantize_lm_head"):
        # the head at its own width; a tied one is untied, its quantized copy stored beside the 16-bit embedding
        head = arch.vocab_size * arch.hidden_size
        hb = float(options.get("lm_head_bits") or options.get("bits") or 4)
        head_bytes = head * (hb + (16.0 + hb) * per + 32.0 / arch.hidden_size) / 8
        if not arch.tie_word_embeddings:
            other -= head  # no longer 16-bit
    if method == "bnb-int8":
        bits = 8.0 + 32.0 / arch.hidden_size  # int8 + an fp32 scale per row
    elif method in ("bnb-nf4", "bnb-fp4"):
        bits = 4.0 + 32.0 / 64  # 4-bit + an fp32 absmax per 64 (double quantization makes it smaller)
    elif method in ("gptq", "awq", "hqq"):
        b = float(options.get("bits") or 4)
        bits = b + (16.0 + b) * per + 32.0 / arch.hidden_size  # + scales, zeros, act-order index
    elif method == "gguf":
        bpw, _ = _GGUF_BPW.get(str(options.get("quant_type") or "").lower(), (16.0, False))
        bits = max(bpw, 8.5) if bpw < 16 else bpw  # K-mixes give some tensors more bits than their name
        # 1-D tensors are F32 in GGUF: count everything else at 32 bits as the bound
        return int((linear * bits / 8 + other * 4) * 1.05) + (16 << 20)
    else:
        bits = 16.0
    return int((linear * bits / 8 + head_bytes + other * 2) * 1.05) + (16 << 20)


def _check_space(ctx: _Context, selected: list[VariantSpec], model_path: Path) -> None:
    """The output folder is writable and has room for every artifact still to be made (an upper bound)."""
    import json
    import os
    import shutil

    from llmopt.errors import InputError

    existing = ctx.out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(
            f"cannot write the output folder {ctx.out} ({existing} is not writable).",
            "Choose an --output folder you can write to.",
        )
    try:
        config = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return  # the backends report a model without a readable config themselves
    needed: list[tuple[str, int]] = []
    transient = 0
    for v in selected:
        if (ctx.out / ARTIFACTS_DIR / v.name / MANIFEST_NAME).is_file():
            continue  # made by an earlier run: reused, or replaced by one of about the same size
        try:
            nbytes = artifact_bytes_bound(v.method, v.backend_options(), config)
            if v.method == "gguf":
                transient = max(transient, artifact_bytes_bound("fp16", {}, config))  # the converter's f16 file
        except LlmoptError:
            return  # a model family estimate.py cannot size: no honest bound, no check
        needed.append((v.name, nbytes))
    total = sum(n for _, n in needed) + transient
    free = shutil.disk_usage(existing).free
    if needed and total > free:
        from llmopt.errors import BackendUnavailableError

        gb = 1e9
        parts = ", ".join(f"{name} {n / gb:.2f} GB" for name, n in needed)
        raise BackendUnavailableError(
            f"not enough disk space for the artifacts: up to {total / gb:.2f} GB needed ({parts}"
            + (f", plus {transient / gb:.2f} GB while converting to GGUF" if transient else "")
            + f"), {free / gb:.2f} GB free on {existing.resolve()}.",
            "Free space there, choose another --output folder, or run fewer variants (--only).",
        )


def _run_variant(ctx: _Context, variant: VariantSpec, publish: bool) -> VariantOutcome:
    outcome = not_run_outcome(variant)
    outcome.status = "error"
    stage = "quantize"
    try:
        art, reused, reason = _quantized(ctx, variant)
        outcome.format = art.manifest.format
        outcome.quantize = QuantizeOutcome(reused=reused, seconds=art.manifest.quantize_seconds, reason=reason)
        stage = "evaluate"
        report, eval_reused = _evaluated(ctx, variant, art)
        assert report.gate is not None
        outcome.evaluation_reused = eval_reused
        outcome.evaluation = report
        outcome.gate = report.gate
        outcome.status = "passed" if report.gate.passed else "gate_failed"
        if ctx.recipe.evaluation.serving is not None:
            stage = "serve"
            from llmopt.evaluate.bench_process import stop_waiting

            stop_waiting()  # a server gets the GPU's memory without idle measurement processes' CUDA contexts
            report = _served(ctx, variant, art, report, outcome)
            assert report.gate is not None
            outcome.evaluation = report
            outcome.gate = report.gate
            outcome.status = "passed" if report.gate.passed else "gate_failed"
        if outcome.status == "gate_failed" and report.gate is not None:
            failed = [c.message for c in report.gate.failures()]
            ctx.reporter.info(f"{variant.name}: gate failed: {'; '.join(failed)}")
        if publish and outcome.status == "passed" and not _one_gguf_repo(ctx.recipe):
            stage = "publish"
            outcome.publish = _publish(ctx, variant, art)
    except InterruptedRunError as exc:
        if exc.partial is not None and stage == "evaluate":
            _keep_interrupted(ctx, outcome, exc.partial)
        raise
    except LlmoptError as exc:
        if interrupt.requested():
            raise InterruptedRunError("interrupted.") from None
        outcome.status = "error"
        outcome.error = VariantError(
            stage=stage,
            type=type(exc).__name__,
            message=exc.message,
            hint=exc.hint,
            exit_code=exc.exit_code,
            # e.g. the traceback of a failed speed measurement's process
            traceback=getattr(exc, "detail", None) or None,
        )
        ctx.reporter.info(f"{variant.name}: {stage} failed: {exc.message}")
        if stage == "evaluate" and isinstance(exc.partial, EvalReport):
            _keep_scores(ctx, outcome, exc.partial, "failed")
    except Exception as exc:  # a bug or a library failure in one variant must not stop the others
        if interrupt.requested():
            # a library turned our KeyboardInterrupt into its own error: still an interrupt
            raise InterruptedRunError("interrupted.") from None
        outcome.status = "error"
        outcome.error = VariantError(
            stage=stage,
            type=type(exc).__name__,
            message=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            hint="Unexpected: the traceback is in report.json; please report it.",
            exit_code=EXIT_BUG,
            traceback=traceback.format_exc(),
        )
        ctx.reporter.info(f"{variant.name}: {stage} failed: {type(exc).__name__}: {exc}")
    return outcome


def _keep_interrupted(ctx: _Context, outcome: VariantOutcome, partial: EvalReport) -> None:
    """An interrupt during the speed measurement: the report keeps the variant's finished scores, not run (no gate,
    nothing in its manifest), so a rerun evaluates it again, speed included, and a merge never prefers it."""
    outcome.status = "not_run"
    outcome.error = None
    _keep_scores(ctx, outcome, partial, "interrupted")
    ctx.interrupted = outcome


def _keep_scores(ctx: _Context, outcome: VariantOutcome, partial: EvalReport, why: str) -> None:
    """The variant's finished scores in the report when its speed measurement was interrupted or failed: not gated,
    nothing in its manifest (a rerun evaluates it again, speed included)."""
    outcome.gate = None
    outcome.evaluation = partial.without_gate()
    outcome.evaluation_reused = False
    outcome.incomplete = f"speed not measured: {why}"
    what = "interrupted while measuring speed" if why == "interrupted" else "its speed measurement failed"
    ctx.notes.append(
        f"{outcome.name}: {what}; its perplexity"
        + (" and KL divergence are" if partial.artifact.distribution is not None else " is")
        + " shown, not gated and not stored (a rerun evaluates it again)"
    )


# --- quantize (or reuse) ---------------------------------------------------------------------------


def _quantized(ctx: _Context, variant: VariantSpec) -> tuple[Artifact, bool, str | None]:
    from llmopt import api

    art_dir = ctx.out / ARTIFACTS_DIR / variant.name
    art, reason = reusable_artifact(ctx, variant, art_dir)
    if art is not None:
        ctx.reporter.info(f"{variant.name}: artifact up to date, not quantizing again")
        return art, True, None
    if reason:
        ctx.reporter.info(f"{variant.name}: quantizing ({reason})")
    if variant.name in ctx.replace_artifacts:
        _remove_artifact_folder(art_dir)
    elif art_dir.is_symlink():
        # a link to an artifact elsewhere (another run's) that cannot be reused: the new artifact takes the link's
        # place; what it pointed to is left as it was, never quantized over
        ctx.reporter.info(f"{variant.name}: {art_dir} is a link to {os.path.realpath(art_dir)}: replacing the link")
        art_dir.unlink()
    cal = ctx.recipe.calibration
    art = api.quantize(
        ctx.model_arg,
        variant.method,
        art_dir,
        options=variant.options,
        calibration=cal.dataset if variant.needs_calibration() else None,
        samples=cal.samples,
        seq_len=cal.seq_len,
        seed=cal.seed,
        device=ctx.recipe.evaluation.device,
        overwrite=True,  # only reached when the folder is missing, unfinished or out of date
        recipe=ctx.record(variant),
        reporter=ctx.reporter,
        trust_remote_code=ctx.recipe.model.trust_remote_code,
    )
    return art, False, reason


def _remove_artifact_folder(folder: Path) -> None:
    """--overwrite: the run's own artifacts/VARIANT goes (a link there goes, never what it points to)."""
    import shutil

    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.is_dir():
        shutil.rmtree(folder)


def _recorded_options(method: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """A manifest's options with the defaults of options added since it was written (an artifact made before
    ``quantize_lm_head`` existed was made without it); None when they no longer validate."""
    from llmopt.backends.base import describe_backend

    try:
        return describe_backend(method).parse_options(options).model_dump(mode="json")
    except LlmoptError:
        return None


def _same_options(method: str, recorded: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether an artifact made with ``recorded`` options is what ``wanted`` would make: options added since it was
    made read as their defaults, and options that only change the speed of making it (AWQ's batch_size) are left
    out."""
    from llmopt.backends.base import describe_backend

    speed_only = describe_backend(method).speed_only_options

    def result(options: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if options is None else {k: v for k, v in options.items() if k not in speed_only}

    return result(recorded) == result(wanted) or result(_recorded_options(method, recorded)) == result(wanted)


def reusable_artifact(ctx: _Context, variant: VariantSpec, art_dir: Path) -> tuple[Artifact | None, str | None]:
    """The existing artifact if it matches the recipe and its files verify; else why not."""
    if not art_dir.exists():
        return None, None
    if not (art_dir / MANIFEST_NAME).is_file():
        return None, "the folder holds an unfinished artifact"
    try:
        # a damaged stored evaluation does not make the files unusable: they are verified below, evaluated again
        art = Artifact.open(art_dir, results_replaceable=True)
    except NewerArtifactError:
        raise  # a newer llmopt's artifact: upgrade, never re-made (overwritten) by this one
    except LlmoptError:
        return None, "its manifest is unreadable"
    m = art.manifest
    if m.backend != variant.method:
        return None, f"method changed ({m.backend} -> {variant.method})"
    options = {k: v for k, v in m.options.items() if k != "_resolved"}
    if not _same_options(m.backend, options, variant.backend_options()):
        return None, "options changed"
    if m.source.model != ctx.model_arg or (m.source.weights_sha256 or {}) != ctx.source_weights:
        return None, "the source model changed"
    if variant.needs_calibration():
        got = m.calibration
        if (
            _stored_calibration(m) != ctx.recipe.calibration
            or got is None
            or (ctx.calib_text_sha256 is not None and got.text_sha256 != ctx.calib_text_sha256)
        ):
            return None, "calibration changed"
    problems = art.verify()
    if problems:
        return None, f"its files changed ({', '.join(problems[:3])})"
    return art, None


def _stored_calibration(m: Manifest) -> CalibrationSpec | None:
    """The calibration settings an artifact was made with (the seed is in its recipe record), if recorded."""
    got = m.calibration
    seed = (((m.recipe or {}).get("resolved") or {}).get("calibration") or {}).get("seed")
    if got is None or seed is None:
        return None
    try:
        return CalibrationSpec(dataset=got.dataset, samples=got.samples, seq_len=got.seq_len, seed=seed)
    except ValueError:
        return None


# --- evaluate (or reuse) ---------------------------------------------------------------------------


def _evaluated(ctx: _Context, variant: VariantSpec, art: Artifact) -> tuple[EvalReport, bool]:
    from llmopt import api

    gate = ctx.recipe.gate_for(variant)
    previous = reusable_evaluation(ctx, art)
    if previous is not None:
        ctx.reporter.info(f"{variant.name}: evaluation up to date, not scoring again")
        report = regate(art, previous, gate)
        return report, True
    ev = ctx.recipe.evaluation
    from llmopt.evaluate.throughput import one_time_build_notice

    notice = one_time_build_notice(art.manifest.runner, ctx.device, ev.kernel)
    if notice:  # scoring loads the kernels first, so the wait comes here
        ctx.reporter.info(notice)
    report = api.evaluate(
        art.path,
        ctx.model_arg,
        ev,
        gate=gate,
        reporter=ctx.reporter,
        trust_remote_code=ctx.recipe.model.trust_remote_code,
        baseline_speeds=ctx.baseline_speeds,
        tasks_unsupported="record",  # a GGUF variant records "not for gguf"; the others still run them
    )
    return report, False


def reusable_evaluation(ctx: _Context, art: Artifact) -> EvalReport | None:
    """The evaluation in the manifest if it was made with the recipe's settings on these very files."""
    from llmopt.evaluate.gate import evaluation_problems

    ev = art.manifest.evaluation
    # a /1 evaluation (written before the bump) is reused like a /2 one when it answers the same measurement:
    # the checks below compare what it measured, and a /1 report without KLD or tasks asked for does not match
    if ev is None or ev.schema_ not in EVAL_SCHEMAS_READ:
        return None
    stored = ev.spec()
    s = ev.settings
    # evaluations from before placements were recorded ran on one device
    placement = s.placement if s.placement is not None else (None if ctx.multi_gpu else ctx.placement_label)
    same = (
        stored is not None
        and stored.same_measurement(ctx.recipe.evaluation, ctx.device)
        # what the spec alone does not pin: the text's content, the hardware "auto" resolved to, the baseline,
        # the artifact's files and the libraries that computed the numbers
        and s.text_sha256 == ctx.eval_text_sha256
        and s.device == ctx.device_label
        and placement == ctx.placement_label
        and ev.baseline.model == ctx.model_arg
        and ev.artifact_files_sha256 == files_digest(art.manifest.files)
        and all(ev.packages().get(k) == v for k, v in ctx.versions.items())
    )
    if not same:
        return None
    wrong = evaluation_problems(ev)
    if wrong:
        # an edited summary (say, a lowered delta_pct) must not be re-gated as if it were measured
        ctx.reporter.info(f"stored evaluation does not add up ({wrong[0]}): scoring again")
        return None
    return ev.model_copy()


def regate(art: Artifact, evaluation: EvalReport, gate: GateSpec) -> EvalReport:
    """Apply ``gate`` to a stored evaluation; record the result in the manifest if it changed."""
    result = apply_gate(gate, evaluation)
    report = evaluation.model_copy(update={"gate": result})
    if art.manifest.gate != result:
        art.manifest.gate = result
        art.save()
    return report


# --- serve under load (or reuse) -------------------------------------------------------------------

SERVING_DIR = "serving"


def _serving_tokenizer(ctx: _Context) -> str | None:
    """The FP16 model's tokenizer makes every model's prompts (the same token lengths for all of them)."""
    from llmopt.serving.bench import default_tokenizer_source

    return default_tokenizer_source(ctx.model_arg)


def _served(
    ctx: _Context, variant: VariantSpec, art: Artifact, report: EvalReport, outcome: VariantOutcome
) -> EvalReport:
    """Serve the variant under ``evaluation.serving`` (unless its manifest holds a measurement with these very
    settings), put the result into its evaluation, apply the gate again (the SLO checks read it) and record both
    in the manifest. A server that dies mid-run leaves what it measured in the outcome and raises (the variant
    errors; the manifest keeps no partial measurement, so the next run measures again)."""
    from llmopt.errors import BackendUnavailableError
    from llmopt.serving.measure import serve_model

    spec = ctx.recipe.evaluation.serving
    assert spec is not None
    gate = ctx.recipe.gate_for(variant)
    _serve_baseline(ctx, spec)
    stored = report.serving
    wanted = spec.model_dump(mode="json")
    if stored is not None and stored.spec == wanted and stored.device == ctx.device_label and not stored.failed:
        ctx.reporter.info(f"{variant.name}: serving measurement up to date, not serving again")
        serving = stored
    else:
        ctx.reporter.info(f"{variant.name}: serving under load ({_trace_text(spec)})")
        with ctx.reporter.step(f"{variant.name}: serving"):
            serving = serve_model(
                art.path,
                spec,
                tokenizer=_serving_tokenizer(ctx),
                work_dir=ctx.out / SERVING_DIR / variant.name,
                device=ctx.device_label,
                server_device=ctx.device_spec or ctx.device,  # a model split over GPUs: the server's own
                log=ctx.reporter.info,
            )
    evaluation = report.without_gate().model_copy(update={"serving": serving})
    gated = evaluation.model_copy(update={"gate": apply_gate(gate, evaluation)})
    if serving.failed:
        outcome.evaluation = gated
        outcome.gate = gated.gate
        raise BackendUnavailableError(
            f"serving failed: {serving.failed}.",
            f"The points measured until then are in the report; see the server log in {SERVING_DIR}/{variant.name}/.",
        )
    if serving is not stored:
        art.manifest.evaluation = evaluation
        art.manifest.gate = gated.gate
        art.save()
    elif art.manifest.gate != gated.gate:
        art.manifest.gate = gated.gate
        art.save()
    return gated


def _serve_baseline(ctx: _Context, spec: Any) -> None:
    """The FP16 model served with the same trace, once per run; a failure is a note, never a variant's error."""
    if not spec.baseline or ctx.baseline_serving_tried:
        return
    ctx.baseline_serving_tried = True
    from llmopt.atomic import write_json_atomic
    from llmopt.serving.measure import serve_model

    folder = ctx.out / SERVING_DIR / "fp16-baseline"
    stored_file = folder / "serving.json"
    weights = sha256_json(ctx.source_weights)
    stored = _stored_serving(stored_file)
    if (
        stored is not None
        and stored.spec == spec.model_dump(mode="json")
        and stored.device == ctx.device_label
        and stored.model == ctx.model_arg
        and stored.model_sha256 == weights
        and not stored.failed
    ):
        ctx.reporter.info("FP16 baseline: serving measurement up to date, not serving again")
        ctx.baseline_serving = stored
        return
    ctx.reporter.info(f"FP16 baseline: serving under load ({_trace_text(spec)})")
    try:
        with ctx.reporter.step("FP16 baseline: serving"):
            served = serve_model(
                ctx.model_arg,
                spec,
                role="baseline",
                tokenizer=_serving_tokenizer(ctx),
                work_dir=folder,
                device=ctx.device_label,
                server_device=ctx.device_spec or ctx.device,  # a model split over GPUs: the server's own
                log=ctx.reporter.info,
            )
    except LlmoptError as exc:
        note = f"the FP16 baseline could not be served ({exc.message.rstrip('.')}): no serving comparison"
        ctx.notes.append(note + (f"; {exc.hint}" if exc.hint else ""))
        ctx.reporter.info(note)
        return
    served.model_sha256 = weights
    ctx.baseline_serving = served
    if served.failed:
        ctx.notes.append(f"the FP16 baseline's server failed: {served.failed}")
    else:  # kept in the run folder: the next run of the same recipe reuses it, as it reuses the variants'
        write_json_atomic(stored_file, served.to_json())


def _stored_serving(path: Path) -> ServingReport | None:
    import json

    try:
        return ServingReport.model_validate(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _trace_text(spec: Any) -> str:
    where = (
        f"{', '.join(f'{r:g}' for r in spec.rates)} req/s" if spec.rates else f"concurrency {spec.concurrency}"
    )
    return f"{where}, {spec.requests} requests each"


# --- publish ---------------------------------------------------------------------------------------


def repo_target(recipe: Recipe, variant: VariantSpec, org: str | None) -> tuple[str, str | None]:
    """(repo id, branch or None) for a variant, from the recipe's publish template."""
    spec = recipe.publish
    if spec is None:
        from llmopt.recipe import PublishSpec

        spec = PublishSpec.model_validate({})
    fields = {
        "org": org or spec.organization or "{org}",
        "model_name": model_name(recipe),
        "variant": variant.name,
        "method": variant.method,
    }
    repo_id = spec.repo_id.format(**fields)
    branch = variant.name if spec.mode == "branch-per-variant" else None
    return repo_id, branch


def model_name(recipe: Recipe) -> str:
    """The model's short name for repo ids: the base model's Hub name, else the source's last path part."""
    base = (recipe.publish.base_model if recipe.publish else None) or recipe.model.source
    name = base.rstrip("/").replace("\\", "/").split("/")[-1]
    name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]", "-", name) or "model"


def _publish(ctx: _Context, variant: VariantSpec, art: Artifact) -> dict[str, Any]:
    from llmopt import hub

    recipe = ctx.recipe
    spec = recipe.publish
    repo_id, branch = repo_target(recipe, variant, ctx.org)
    result = hub.publish(
        art.path,
        repo_id,
        private=spec.private if spec else False,
        revision=branch,
        base_model=spec.base_model if spec else None,
        license=spec.license if spec else None,
        tags=spec.tags if spec else None,
        benchmarks=spec.benchmarks if spec else None,
        benchmark_local_data=spec.benchmark_local_data if spec else False,
        reporter=ctx.reporter,
    )
    result.pop("card", None)  # it is on the Hub; the run report keeps where and which commit
    return result


def _one_gguf_repo(recipe: Recipe) -> bool:
    return recipe.publish is not None and recipe.publish.mode == "gguf-one-repo"


def _publish_gguf_repo(ctx: _Context, outcomes: list[VariantOutcome]) -> None:
    """``publish.mode: gguf-one-repo``: one commit, after every variant is gated, with a file per passing variant;
    the variants whose gate failed are listed on the card. Its failure is each passing variant's publish error."""
    from llmopt.gguf_repo import publish_gguf_repo

    passed = [o for o in outcomes if o.status == "passed"]
    if not passed:
        return  # nothing to upload; the run's exit code already says why (3, or the first error)
    spec = ctx.recipe.publish
    assert spec is not None
    repo_id, _ = repo_target(ctx.recipe, ctx.recipe.variant(passed[0].name), ctx.org)
    gated = [o.name for o in outcomes if o.status in ("passed", "gate_failed")]
    try:
        result = publish_gguf_repo(
            ctx.out,
            repo_id,
            only=gated,
            private=spec.private,
            base_model=spec.base_model,
            license=spec.license,
            tags=spec.tags,
            reporter=ctx.reporter,
        )
    except InterruptedRunError:
        raise
    except LlmoptError as exc:
        ctx.reporter.info(f"publish to {repo_id} failed: {exc.message}")
        for o in passed:
            o.status = "error"
            o.error = VariantError(
                stage="publish", type=type(exc).__name__, message=exc.message, hint=exc.hint, exit_code=exc.exit_code
            )
        return
    files = {row.variant: row.path for row in result.table if row.origin == "this commit"}
    for o in passed:
        o.publish = {
            "repo_id": result.repo_id,
            "revision": None,
            "layout": "gguf-one-repo",
            "file": files.get(o.name),
            "url": result.url,
            "commit_url": result.commit_url,
            "commit_oid": result.commit_oid,
        }


# --- fleets ----------------------------------------------------------------------------------------


def plan_jobs(
    recipe_path: str | Path,
    *,
    output_root: str | Path = "llmopt-runs",
    publish: bool = False,
    sets: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One independent job per variant, each a ``llmopt run RECIPE --only NAME --output ...`` command.

    For a scheduler (CI matrix, Slurm array, Kubernetes Jobs); ``llmopt report merge`` combines their
    ``report.json`` files afterwards. The recipe is validated here, so a bad one fails before any job starts.
    """
    import shlex

    recipe = load_recipe(recipe_path, parse_set_flags(sets))
    jobs = []
    for v in recipe.variants:
        out = f"{str(output_root).rstrip('/')}/{v.name}"
        args = ["llmopt", "run", str(recipe_path), "--only", v.name, "--output", out]
        for s in sets or []:
            args += ["--set", s]
        if publish:
            args.append("--publish")
        jobs.append(
            {
                "variant": v.name,
                "method": v.method,
                "device": recipe.evaluation.device,
                "output": out,
                "command": shlex.join(args),
            }
        )
    return jobs
