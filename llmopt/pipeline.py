"""``llmopt run``: every variant of a recipe through quantize -> evaluate -> gate (-> publish).

Resumable: a variant whose artifact already exists, was built from the same source, method, options
and calibration, and whose files still match their hashes, is not quantized again; one already
evaluated with the same settings (same text, tokens, window, device, library versions) is not scored
again, but its gate is re-applied with the recipe's current thresholds. A variant that fails is recorded
with its error and the run goes on with the next one. The FP16 baseline is scored once: ``api.evaluate``
caches it.

Exit code of a run (``RunReport['exit_code']``): 0 when every variant passed its gate; otherwise, if any
variant errored, the exit code of the first such error in recipe order (2 bad input, 4 backend or
service unavailable, 5 artifact mismatch, 1 unexpected error); otherwise 3 (a gate failed).
"""

from __future__ import annotations

import hashlib
import re
import time
import traceback
from pathlib import Path
from typing import Any

from llmopt.artifact import MANIFEST_NAME, Artifact, files_digest, sha256_json
from llmopt.errors import EXIT_BUG, EXIT_GATE, EXIT_OK, LlmoptError, OutputExistsError
from llmopt.evaluate.gate import GateSpec, apply_gate
from llmopt.progress import Reporter, SilentReporter
from llmopt.recipe import Recipe, VariantSpec, apply_overrides, load_recipe, parse_set_flags

ARTIFACTS_DIR = "artifacts"


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
        self.device_label = ""
        self.placement_label = ""  # DeviceTarget.describe(): which GPUs a model may be split over
        self.multi_gpu = False
        self.versions: dict[str, str | None] = {}
        self.org: str | None = None

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
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Run the recipe's variants (all, or those named in ``only``) and write the report.

    Returns the run report (schema ``llmopt.run/1``), also written as ``report.json``, ``report.md``
    and PNG plots into the output folder. Problems shared by every variant (missing model or text, no
    Hub token when publishing) raise before any work; a variant's own failure is recorded in the report.
    """
    rep = reporter if reporter is not None else SilentReporter()
    recipe_file: str | None = None
    if not isinstance(recipe, Recipe):
        recipe_file = str(recipe)
        recipe = load_recipe(recipe)
    # typed flags first (None = not given), then --set key.path=value (null clears a key)
    recipe = apply_overrides(recipe, overrides or {})
    recipe = apply_overrides(recipe, parse_set_flags(sets), keep_none=True)
    selected = _select(recipe, only)
    out = Path(output or recipe.output or Path("llmopt-runs") / (recipe.name or "recipe")).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file.", "Choose another --output folder.")

    ctx = _Context(recipe, recipe_file, out, rep)
    started = time.perf_counter()
    _prepare(ctx, selected, publish)
    out.mkdir(parents=True, exist_ok=True)

    outcomes: list[dict[str, Any]] = []
    for i, variant in enumerate(selected, 1):
        rep.info(f"[{i}/{len(selected)}] {variant.name} ({variant.method})")
        outcomes.append(_run_variant(ctx, variant, publish))

    from llmopt.report import build_run_report, write_report

    report = build_run_report(
        recipe={"name": recipe.name, "file": recipe_file, "resolved": recipe.resolved()},
        variants=outcomes,
        output=out,
        seconds=time.perf_counter() - started,
    )
    write_report(report, out)
    return report


def run_exit_code(variants: list[dict[str, Any]]) -> int:
    """0 all passed; else the first error's code in recipe order; else 3 (a gate failed)."""
    for v in variants:
        if v.get("status") == "error":
            return int((v.get("error") or {}).get("exit_code") or EXIT_BUG)
    if any(v.get("status") != "passed" for v in variants):
        return EXIT_GATE
    return EXIT_OK


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
        source = resolve(recipe.model.source, recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
        if recipe.model.revision is not None:
            # api.quantize/evaluate take a model spec without a revision: hand them the snapshot folder of
            # that revision; the Hub id and revision stay recorded in the manifest's recipe record.
            ctx.model_arg = str(source.path)
        ctx.source_weights = source.weights_sha256()
        ctx.eval_text_sha256 = sha256_json(load_text(recipe.evaluation.dataset))
        if recipe.calibration.dataset and any(v.needs_calibration() for v in selected):
            text = load_text(recipe.calibration.dataset, purpose="calibration")
            ctx.calib_text_sha256 = hashlib.sha256(text.encode()).hexdigest()
        target = resolve_target(recipe.evaluation.device)
        ctx.device = target.primary
        ctx.device_label = device_name(ctx.device)
        ctx.placement_label = target.describe()
        ctx.multi_gpu = target.multi_gpu
        ctx.versions = {k: package_versions((k,)).get(k) for k in ("torch", "transformers")}


def _run_variant(ctx: _Context, variant: VariantSpec, publish: bool) -> dict[str, Any]:
    outcome: dict[str, Any] = {
        "name": variant.name,
        "method": variant.method,
        "format": None,
        "status": "error",
        "artifact": f"{ARTIFACTS_DIR}/{variant.name}",
        "quantize": None,
        "evaluation_reused": None,
        "evaluation": None,
        "gate": None,
        "publish": None,
        "error": None,
    }
    stage = "quantize"
    try:
        art, reused, reason = _quantized(ctx, variant)
        outcome["format"] = art.manifest.format
        outcome["quantize"] = {"reused": reused, "seconds": art.manifest.quantize_seconds, "reason": reason}
        stage = "evaluate"
        report, eval_reused = _evaluated(ctx, variant, art)
        outcome["evaluation_reused"] = eval_reused
        outcome["evaluation"] = report
        outcome["gate"] = report["gate"]
        outcome["status"] = "passed" if report["gate"]["passed"] else "gate_failed"
        if outcome["status"] == "gate_failed":
            failed = [c["message"] for c in report["gate"]["checks"] if not c["passed"]]
            ctx.reporter.info(f"{variant.name}: gate failed: {'; '.join(failed)}")
        if publish and outcome["status"] == "passed":
            stage = "publish"
            outcome["publish"] = _publish(ctx, variant, art)
    except LlmoptError as exc:
        outcome["status"] = "error"
        outcome["error"] = {
            "stage": stage,
            "type": type(exc).__name__,
            "message": exc.message,
            "hint": exc.hint,
            "exit_code": exc.exit_code,
        }
        ctx.reporter.info(f"{variant.name}: {stage} failed: {exc.message}")
    except Exception as exc:  # a bug or a library failure in one variant must not stop the others
        outcome["status"] = "error"
        outcome["error"] = {
            "stage": stage,
            "type": type(exc).__name__,
            "message": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            "hint": "Unexpected: the traceback is in report.json; please report it.",
            "exit_code": EXIT_BUG,
            "traceback": traceback.format_exc(),
        }
        ctx.reporter.info(f"{variant.name}: {stage} failed: {type(exc).__name__}: {exc}")
    return outcome


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


def reusable_artifact(ctx: _Context, variant: VariantSpec, art_dir: Path) -> tuple[Artifact | None, str | None]:
    """The existing artifact if it matches the recipe and its files verify; else why not."""
    if not art_dir.exists():
        return None, None
    if not (art_dir / MANIFEST_NAME).is_file():
        return None, "the folder holds an unfinished artifact"
    try:
        art = Artifact.open(art_dir)
    except LlmoptError:
        return None, "its manifest is unreadable"
    m = art.manifest
    if m.backend != variant.method:
        return None, f"method changed ({m.backend} -> {variant.method})"
    options = {k: v for k, v in m.options.items() if k != "_resolved"}
    if options != variant.backend_options():
        return None, "options changed"
    if m.source.model != ctx.model_arg or (m.source.weights_sha256 or {}) != ctx.source_weights:
        return None, "the source model changed"
    if variant.needs_calibration():
        cal = ctx.recipe.calibration
        got = m.calibration
        recorded_seed = (((m.recipe or {}).get("resolved") or {}).get("calibration") or {}).get("seed")
        if (
            got is None
            or got.dataset != cal.dataset
            or got.samples != cal.samples
            or got.seq_len != cal.seq_len
            or recorded_seed != cal.seed
            or (ctx.calib_text_sha256 is not None and got.text_sha256 != ctx.calib_text_sha256)
        ):
            return None, "calibration changed"
    problems = art.verify()
    if problems:
        return None, f"its files changed ({', '.join(problems[:3])})"
    return art, None


# --- evaluate (or reuse) ---------------------------------------------------------------------------


def _evaluated(ctx: _Context, variant: VariantSpec, art: Artifact) -> tuple[dict[str, Any], bool]:
    from llmopt import api

    gate = ctx.recipe.gate_for(variant)
    previous = reusable_evaluation(ctx, art)
    if previous is not None:
        ctx.reporter.info(f"{variant.name}: evaluation up to date, not scoring again")
        report = regate(art, previous, gate)
        return report, True
    ev = ctx.recipe.evaluation
    report = api.evaluate(
        art.path,
        ctx.model_arg,
        ev.dataset,
        context_length=ev.context_length,
        stride=ev.stride,
        max_tokens=ev.max_tokens,
        add_bos=ev.add_bos,
        device=ev.device,
        batch_size=ev.batch_size,
        gate=gate,
        kernel=ev.kernel,
        throughput=ev.throughput,
        reporter=ctx.reporter,
        trust_remote_code=ctx.recipe.model.trust_remote_code,
    )
    return report, False


def reusable_evaluation(ctx: _Context, art: Artifact) -> dict[str, Any] | None:
    """The evaluation in the manifest if it was made with the recipe's settings on these very files."""
    from llmopt.api import EVAL_SCHEMA

    ev_spec = ctx.recipe.evaluation
    ev = art.manifest.evaluation
    if not ev or ev.get("schema") != EVAL_SCHEMA:
        return None
    s = ev.get("settings") or {}
    packages = (ev.get("environment") or {}).get("packages") or {}
    same = (
        s.get("dataset") == ev_spec.dataset
        and s.get("text_sha256") == ctx.eval_text_sha256
        and s.get("context_length") == ev_spec.context_length
        and s.get("stride") == ev_spec.resolved_stride()
        and s.get("add_bos") == ev_spec.add_bos
        and s.get("max_tokens") == ev_spec.max_tokens
        and s.get("device") == ctx.device_label
        # evaluations from before placements were recorded ran on one device
        and s.get("placement", None if ctx.multi_gpu else ctx.placement_label) == ctx.placement_label
        and (ev.get("baseline") or {}).get("model") == ctx.model_arg
        and ev.get("artifact_files_sha256") == files_digest(art.manifest.files)
        and all(packages.get(k) == v for k, v in ctx.versions.items())
        and _same_throughput(ev, ev_spec.throughput, ctx.device)
    )
    return dict(ev) if same else None


def _same_throughput(ev: dict[str, Any], wanted: Any, device: str) -> bool:
    """True when no speed is asked for, or the stored one was measured with the same settings."""
    if wanted is None:
        return True
    stored = (ev.get("throughput") or {}).get("settings")
    return bool(stored == wanted.resolved(device).model_dump(mode="json"))


def regate(art: Artifact, evaluation: dict[str, Any], gate: GateSpec) -> dict[str, Any]:
    """Apply ``gate`` to a stored evaluation; record the result in the manifest if it changed."""
    report = dict(evaluation)
    result = apply_gate(gate, report).model_dump(mode="json")
    result["spec"] = gate.model_dump(mode="json")
    report["gate"] = result
    if art.manifest.gate != result:
        art.manifest.gate = result
        art.save()
    return report


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
        reporter=ctx.reporter,
    )
    result.pop("card", None)  # it is on the Hub; the run report keeps where and which commit
    return result


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

    recipe = apply_overrides(load_recipe(recipe_path), parse_set_flags(sets), keep_none=True)
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
