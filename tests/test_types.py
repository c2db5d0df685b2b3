"""Typed specs and results (llmopt/specs.py, llmopt/results.py): reports written before still read and write back
the same; the evaluation settings are the same object whether a recipe or CLI flags made them; a stored
evaluation is reused only when every setting it measured with is the one asked for.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from llmopt.artifact import Artifact
from llmopt.errors import InputError
from llmopt.evaluate.gate import evaluation_problems
from llmopt.evaluate.throughput import throughput_section
from llmopt.recipe import apply_overrides, parse_recipe
from llmopt.results import EVAL_SCHEMA, EvalReport, EvalSettings, ModelScore, RunReport, SpeedReport, TasksReport
from llmopt.specs import EvalSpec, ThroughputSpec
from tests.evaldata import scored

ROOT = Path(__file__).resolve().parents[1]
# A run report written by llmopt before the results were typed (schema llmopt.run/1 with llmopt.eval/1 inside).
OLD_RUN = ROOT / "docs" / "results" / "run-cpu" / "report.json"


# --- reports and manifests written before --------------------------------------------------------------


def bnb_manifest(evaluation: Any, *, version: str = "0.1.0") -> dict[str, Any]:
    """A bnb-int8 artifact's manifest as a dict (no files), holding ``evaluation``."""
    return {
        "llmopt_version": version,
        "backend": "bnb-int8",
        "format": "bnb-8bit",
        "runner": "hf",
        "options": {},
        "source": {"model": "m", "resolved_path": "/m"},
        "environment": {"python": "3.11", "platform": "linux", "device": "cpu"},
        "files": {},
        "evaluation": evaluation,
    }


def test_schema_1_run_report_reads_and_writes_back_the_same() -> None:
    data = json.loads(OLD_RUN.read_text())
    report = RunReport.model_validate(data)
    assert report.schema_ == "llmopt.run/1" and report.variants[0].evaluation is not None
    ev = report.variants[0].evaluation
    assert ev.schema_ == "llmopt.eval/1" and ev.settings.context_length == data["settings"]["context_length"]
    assert ev.artifact.perplexity == data["variants"][0]["evaluation"]["artifact"]["perplexity"]
    out = report.to_json()
    assert out == data
    # the same keys in the same order, all the way down (the JSON text is what users diff)
    assert json.dumps(out, indent=2) == json.dumps(data, indent=2)


def test_schema_1_manifest_reads_checks_and_saves_unchanged(tmp_path: Path) -> None:
    """A manifest whose evaluation and gate are the dicts llmopt wrote before: it opens typed, its numbers still
    add up (recomputed from the window scores), its gate re-applies, and saving it writes the same JSON."""
    variant = json.loads(OLD_RUN.read_text())["variants"][0]
    evaluation = {k: v for k, v in variant["evaluation"].items() if k != "gate"}
    manifest = {
        "schema_version": 1,
        **bnb_manifest(evaluation),
        "created_at": "2026-01-01T00:00:00+00:00",
        "gate": variant["gate"],
    }
    (tmp_path / "llmopt.json").write_text(json.dumps(manifest, indent=2) + "\n")
    art = Artifact.open(tmp_path)
    ev, gate = art.manifest.evaluation, art.manifest.gate
    assert isinstance(ev, EvalReport) and gate is not None and gate.spec is not None
    assert ev.delta_pct == evaluation["delta_pct"] and gate.passed is variant["gate"]["passed"]
    assert evaluation_problems(ev, gate) == []
    art.save()
    saved = json.loads((tmp_path / "llmopt.json").read_text())
    assert saved["evaluation"] == evaluation and saved["gate"] == variant["gate"]
    assert list(saved["evaluation"]["artifact"]) == list(evaluation["artifact"])


def test_unknown_keys_survive_and_none_blocks_stay_out() -> None:
    """A key this version does not know (another version's block) is kept; the optional blocks other measurements
    fill (``distribution``, ``tasks``) are absent from the JSON until set."""
    ev = scored(1.0)
    ev["settings"]["dataset"] = "eval.txt"
    ev["artifact"]["from_the_future"] = {"x": 1}
    report = EvalReport.model_validate(ev)
    out = report.to_json()
    assert out["artifact"]["from_the_future"] == {"x": 1}
    assert "distribution" not in out["artifact"] and "tasks" not in out["artifact"] and "throughput" not in out
    assert out["settings"]["max_tokens"] is None  # written as null, as it always was
    dist = dict(DISTRIBUTION)
    report.artifact.distribution = dist  # type: ignore[assignment]  # validated into a Distribution
    assert report.to_json()["artifact"]["distribution"] == dist
    # callers written against the dict reports still read them by key
    assert report["artifact"]["perplexity"] == report.artifact.perplexity and report["schema"] == EVAL_SCHEMA
    assert report.get("throughput") is None and "throughput" not in report


# A run report whose evaluations carry KL divergence, written while the schema was still llmopt.eval/1.
KLD_RUN = ROOT / "docs" / "results" / "run-cpu-kld" / "report.json"


def _kld_evaluation() -> dict[str, Any]:
    variant = json.loads(KLD_RUN.read_text())["variants"][0]
    return {k: v for k, v in variant["evaluation"].items() if k != "gate"}


def test_evaluations_are_written_as_schema_2() -> None:
    """Issue 14, item 6: the distribution and task blocks are part of a bumped, documented schema; what llmopt
    writes now says llmopt.eval/2, and a report from the current output reads back as it was written."""
    assert EVAL_SCHEMA == "llmopt.eval/2"
    numbers = scored(1.0)
    fresh = EvalReport(
        settings=EvalSettings.model_validate(numbers["settings"]),
        baseline=ModelScore.model_validate(numbers["baseline"]),
        artifact=ModelScore.model_validate(numbers["artifact"]),
    )
    assert fresh.to_json()["schema"] == "llmopt.eval/2"
    current = {**_kld_evaluation(), "schema": EVAL_SCHEMA}
    report = EvalReport.model_validate(current)
    assert report.schema_ == EVAL_SCHEMA and report.artifact.distribution is not None
    assert report.to_json() == current


def test_a_schema_1_report_without_kld_still_reads_typed(tmp_path: Path) -> None:
    """A /1 evaluation from before the KL divergence (the current output with the version string set back and the
    blocks /2 documents removed) is a typed EvalReport: its numbers add up, it says it measured no KLD, it writes
    back as /1 (never relabelled), and an artifact holding it opens."""
    old = _kld_evaluation()
    old["schema"] = "llmopt.eval/1"
    del old["artifact"]["distribution"]
    assert not {"tasks", "task_recovery"} & (set(old) | set(old["artifact"]) | set(old["baseline"]))
    report = EvalReport.model_validate(old)
    assert isinstance(report, EvalReport) and report.schema_ == "llmopt.eval/1"
    assert report.artifact.distribution is None and report.artifact.tasks is None and report.task_recovery is None
    assert report.artifact.perplexity == old["artifact"]["perplexity"]
    assert evaluation_problems(report) == []
    spec = report.spec()
    assert spec is not None and spec.kld is False
    assert report.to_json() == old
    manifest = bnb_manifest(old, version="0.1.0")
    (tmp_path / "llmopt.json").write_text(json.dumps(manifest))
    ev = Artifact.open(tmp_path).manifest.evaluation
    assert ev is not None and ev.schema_ == "llmopt.eval/1" and ev.delta_pct == old["delta_pct"]


@pytest.mark.parametrize("schema", ["llmopt.eval/3", "llmopt.eval/10"])
def test_a_newer_evaluation_schema_is_refused_by_name(tmp_path: Path, schema: str) -> None:
    """An evaluation a later llmopt wrote may mean what this one does not know: refused with "upgrade", as a
    newer manifest schema is — as a report, inside an artifact (not dropped as damaged by `eval`, exit 5) and in
    a run report given to `report merge` (exit 2); a schema that is no evaluation's is refused too."""
    from pydantic import ValidationError

    from llmopt.errors import ArtifactError
    from llmopt.report import load_report

    newer = {**_kld_evaluation(), "schema": schema}
    with pytest.raises(ValidationError, match="newer llmopt"):
        EvalReport.model_validate(newer)
    with pytest.raises(ValidationError, match="not an evaluation report's"):
        EvalReport.model_validate({**newer, "schema": "llmopt.run/1"})
    manifest = bnb_manifest(newer, version="9.0.0")
    (tmp_path / "llmopt.json").write_text(json.dumps(manifest))
    for replaceable in (False, True):
        with pytest.raises(ArtifactError, match=f"evaluation of schema {schema}") as err:
            Artifact.open(tmp_path, results_replaceable=replaceable)
        assert "Upgrade llmopt" in (err.value.hint or "")
    run = json.loads(KLD_RUN.read_text())
    run["variants"][0]["evaluation"]["schema"] = schema
    (tmp_path / "report.json").write_text(json.dumps(run))
    with pytest.raises(InputError, match="newer llmopt") as refused:
        load_report(tmp_path / "report.json")
    assert "Upgrade llmopt" in (refused.value.hint or "")


def test_a_hand_edited_type_names_where(tmp_path: Path) -> None:
    """A manifest whose evaluation holds a value of the wrong type is exit 5 naming the key, not a bare
    'validation error'."""
    from llmopt.errors import ArtifactError

    variant = json.loads(OLD_RUN.read_text())["variants"][0]
    evaluation = {k: v for k, v in variant["evaluation"].items() if k != "gate"}
    evaluation["artifact"]["perplexity"] = "low"
    manifest = bnb_manifest(evaluation, version="0.1.0")
    (tmp_path / "llmopt.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"evaluation\.artifact\.perplexity"):
        Artifact.open(tmp_path)


# --- one spec, whichever way it was given -----------------------------------------------------------------


RECIPE = {
    "model": {"source": "m"},
    "evaluation": {
        "dataset": "eval.txt",
        "context_length": 256,
        "stride": 128,
        "max_tokens": 4096,
        "add_bos": True,
        "batch_size": 2,
        "device": "cpu",
        "kernel": "torch",
        "throughput": {"batch_sizes": [1, 4], "gen_len": 8},
    },
    "variants": [{"name": "a", "method": "bnb-int8"}],
}


def test_spec_from_cli_flags_is_the_recipe_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`llmopt eval` builds from its flags the very EvalSpec the recipe's evaluation section makes."""
    from llmopt import api
    from llmopt.cli.main import main

    got: list[EvalSpec] = []

    def fake_evaluate(artifact: Any, baseline: str, spec: EvalSpec, **kw: Any) -> Any:
        got.append(spec)
        raise InputError("stop here", "")

    monkeypatch.setattr(api, "evaluate", fake_evaluate)
    monkeypatch.chdir(tmp_path)
    args = ["eval", "art", "--baseline", "m", "--dataset", "eval.txt", "--context", "256", "--stride", "128"]
    args += ["--max-tokens", "4096", "--add-bos", "--batch-size", "2", "--device", "cpu", "--kernel", "torch"]
    args += ["--throughput", "--batch-sizes", "4,1", "--gen-len", "8", "-q"]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and len(got) == 1
    assert got[0] == parse_recipe(copy.deepcopy(RECIPE)).evaluation


def test_spec_from_run_flags_is_the_recipe_spec() -> None:
    """`llmopt run --context 256` (an override of the recipe) gives the spec of a recipe that says 256."""
    plain = copy.deepcopy(RECIPE)
    plain["evaluation"]["context_length"] = 512
    overridden = apply_overrides(parse_recipe(plain), {"evaluation.context_length": 256, "evaluation.device": None})
    assert overridden.evaluation == parse_recipe(copy.deepcopy(RECIPE)).evaluation


def test_bad_cli_value_is_bad_input() -> None:
    from llmopt.specs import eval_spec

    with pytest.raises(InputError, match="--context 1 is too short"):
        eval_spec(dataset="t.txt", context_length=1)
    with pytest.raises(InputError, match="--max-tokens"):
        eval_spec(dataset="t.txt", max_tokens=1)


# --- reuse compares the spec whole ------------------------------------------------------------------------

BASE = EvalSpec(dataset="eval.txt", context_length=128, throughput=ThroughputSpec())
DISTRIBUTION = {"tokens": 10, "top_k": 256, "kld_mean": 0.01, "kld_stderr": 0.001, "kld_median": 0.005, "kld_p90": 0.02,
                "kld_p99": 0.05, "kld_p999": 0.08, "kld_max": 0.1, "top1_agreement": 0.9,
                "top1_agreement_stderr": 0.01, "delta_p_mean": -0.001, "delta_p_rms": 0.02}  # fmt: skip
# For every measurement field, a value other than BASE's. A field added to EvalSpec fails
# test_every_measurement_field_has_another_value until it is given one here, and is then checked below.
OTHER: dict[str, Any] = {
    "dataset": "other.txt",
    "context_length": 256,
    "stride": 64,
    "max_tokens": 1000,
    "add_bos": True,
    "throughput": None,  # see test_a_stored_speed_measurement_serves_a_spec_that_asks_for_none
    "tasks": ["other_task"],  # these two: see test_stored_task_scores_are_reused_only_for_the_same_tasks
    "task_limit": 5,
}


def stored(spec: EvalSpec, device: str = "cpu") -> EvalReport:
    """The evaluation api.evaluate records for ``spec`` (its settings and speed blocks; numbers made up)."""
    numbers = scored(1.0, context_length=spec.context_length, stride=spec.resolved_stride())
    speed = None
    if spec.throughput is not None:
        side: dict[str, Any] = {"decode": {}, "prefill": {}}
        speed = SpeedReport.model_validate(throughput_section(side, side, spec.throughput, device))
    artifact = ModelScore.model_validate(numbers["artifact"])
    if spec.kld:
        artifact.distribution = DISTRIBUTION  # type: ignore[assignment]  # validated into a Distribution
    if spec.tasks:
        artifact.tasks = TasksReport(requested=spec.tasks, limit=spec.task_limit)
    return EvalReport(
        settings=EvalSettings.of(spec, tokens_total=numbers["settings"]["tokens_total"], device=device),
        baseline=ModelScore.model_validate(numbers["baseline"]),
        artifact=artifact,
        throughput=speed,
    )


def reused(made_with: EvalSpec, wanted: EvalSpec) -> bool:
    spec = stored(made_with).spec()
    return spec is not None and spec.same_measurement(wanted, "cpu")


def test_every_measurement_field_has_another_value() -> None:
    assert set(EvalSpec.measurement_fields()) == set(OTHER) | {"throughput", "kld"}


# throughput, kld and tasks: a stored block is not required when none is asked for (the last tests below)
_OPTIONAL_BLOCKS = ("throughput", "kld", "tasks", "task_limit")


@pytest.mark.parametrize("field", [f for f in EvalSpec.measurement_fields() if f not in _OPTIONAL_BLOCKS])
def test_reuse_refused_when_one_setting_differs(field: str) -> None:
    changed = BASE.model_copy(update={field: OTHER[field]})
    assert reused(BASE, BASE) and reused(changed, changed), "what was measured must be read back from the report"
    assert not reused(BASE, changed) and not reused(changed, BASE)


@pytest.mark.parametrize("field", [f for f in ThroughputSpec.model_fields if f != "seed"] + ["seed"])
def test_reuse_refused_when_one_speed_setting_differs(field: str) -> None:
    other: dict[str, Any] = {
        "batch_sizes": [2],
        "prompt_lens": [64],
        "gen_len": 4,
        "warmup": 0,
        "repetitions": 2,
        "max_seconds_per_point": 5.0,
        "decode_mode": "eager",
        "gpu_hourly_cost": 2.5,
        "seed": 1,
        "marlin_atomics": False,
    }
    assert set(other) == set(ThroughputSpec.model_fields)
    changed = BASE.model_copy(update={"throughput": ThroughputSpec.model_validate({field: other[field]})})
    assert reused(changed, changed)
    assert not reused(BASE, changed) and not reused(changed, BASE)


def test_a_stored_speed_measurement_serves_a_spec_that_asks_for_none() -> None:
    """As before the specs were typed: an evaluation that also measured speed is reused when no speed is asked
    for; one without a speed block is not reused when speed is asked for."""
    without = BASE.model_copy(update={"throughput": None})
    assert reused(BASE, without)
    assert not reused(without, BASE)


def test_stored_task_scores_are_reused_only_for_the_same_tasks() -> None:
    """Task scores (--tasks) are read back from the report; other tasks or another --task-limit score again; an
    evaluation with task scores serves a spec that asks for none, one without them does not serve one that asks."""
    with_tasks = BASE.model_copy(update={"tasks": ["britannica_cloze.yaml"], "task_limit": 8})
    assert reused(with_tasks, with_tasks)
    for other in ({"task_limit": OTHER["task_limit"]}, {"task_limit": None}, {"tasks": OTHER["tasks"]}):
        changed = with_tasks.model_copy(update=other)
        assert not reused(with_tasks, changed) and not reused(changed, with_tasks)
    assert reused(with_tasks, BASE)
    assert not reused(BASE, with_tasks)


def test_a_stored_kld_serves_a_spec_that_asks_for_none() -> None:
    """Likewise the KL divergence: an evaluation that has it is reused by a recipe with kld: false; one without it
    is scored again for a recipe that asks for it (its gates may read it)."""
    without = BASE.model_copy(update={"kld": False})
    assert reused(BASE, without)
    assert not reused(without, BASE)


@pytest.mark.parametrize(("field", "value"), [("batch_size", 8), ("kernel", "marlin"), ("device", "auto")])
def test_how_it_is_measured_does_not_refuse_reuse(field: str, value: Any) -> None:
    """batch_size and kernel change how the windows are computed, not which; the device is compared by what it
    resolved to (the caller's job: settings.device and settings.placement)."""
    assert field not in EvalSpec.measurement_fields()
    assert reused(BASE, BASE.model_copy(update={field: value}))


def test_a_schema_1_evaluation_of_the_same_measurement_is_reused_by_a_run(tmp_path: Path) -> None:
    """After the bump to llmopt.eval/2, a run's artifacts evaluated under /1 are not scored again for the bump alone:
    a /1 evaluation with KLD is reused when it answers the same measurement (and kept as /1); one without KLD is
    not, when the recipe asks for KLD (the default), as before the bump."""
    from types import SimpleNamespace

    from llmopt.artifact import files_digest
    from llmopt.pipeline import _Context, reusable_evaluation
    from llmopt.progress import SilentReporter
    from tests.evaldata import distribution

    recipe = parse_recipe(
        {
            "model": {"source": "m"},
            "evaluation": {"dataset": "eval.txt", "context_length": 128, "device": "cpu"},
            "variants": [{"name": "a", "method": "bnb-int8"}],
        }
    )
    ctx = _Context(recipe, None, tmp_path, SilentReporter())
    ctx.device = ctx.device_label = ctx.placement_label = "cpu"
    ctx.eval_text_sha256 = "cd" * 32
    numbers = scored(1.0, context_length=128, stride=recipe.evaluation.resolved_stride())
    settings = EvalSettings.of(
        recipe.evaluation,
        text_sha256="cd" * 32,
        **{k: numbers["settings"][k] for k in ("tokens_total", "tokens_scored", "windows")},
        device="cpu",
        placement="cpu",
    )
    made = EvalReport(
        settings=settings,
        baseline=ModelScore.model_validate({**numbers["baseline"], "model": "m"}),
        artifact=ModelScore.model_validate(
            {**numbers["artifact"], "distribution": distribution(0.02, numbers["settings"])}
        ),
        delta_pct=numbers["delta_pct"],
        delta_pct_stderr=numbers["delta_pct_stderr"],
        artifact_files_sha256=files_digest({}),
    )

    def reused(ev: EvalReport) -> EvalReport | None:
        return reusable_evaluation(ctx, SimpleNamespace(manifest=SimpleNamespace(evaluation=ev, files={})))  # type: ignore[arg-type]

    assert reused(made) is not None  # /2, as written now
    old = EvalReport.model_validate({**made.to_json(), "schema": "llmopt.eval/1"})
    again = reused(old)
    assert again is not None and again.schema_ == "llmopt.eval/1"
    no_kld = made.to_json()
    del no_kld["artifact"]["distribution"]
    assert reused(EvalReport.model_validate({**no_kld, "schema": "llmopt.eval/1"})) is None


@pytest.mark.parametrize(
    "schema",
    ["llmopt.eval/\u00b2", "llmopt.eval/\uff13", "llmopt.eval/03", "llmopt.eval/" + "9" * 5000, "llmopt.eval/0"],
)
def test_odd_evaluation_schemas_are_no_evaluation_reports(schema: str) -> None:
    """Superscript or fullwidth digits (str.isdigit accepts them, int() does not), a leading zero, 5,000 digits:
    refused as no evaluation report's, never a traceback nor a request to upgrade."""
    from pydantic import ValidationError

    from llmopt.results import eval_schema_problem, newer_eval_schema

    assert not newer_eval_schema(schema)
    assert "is not an evaluation report's" in (eval_schema_problem(schema) or "")
    with pytest.raises(ValidationError, match="not an evaluation report's"):
        EvalReport.model_validate({**_kld_evaluation(), "schema": schema})


def test_a_newer_artifact_stops_a_run_instead_of_being_quantized_again(tmp_path: Path) -> None:
    """An older llmopt run must not treat a newer llmopt's artifact as unreadable and quantize over it."""
    from llmopt.errors import NewerArtifactError
    from llmopt.pipeline import _Context, reusable_artifact
    from llmopt.progress import SilentReporter

    recipe = parse_recipe(
        {
            "model": {"source": "m"},
            "evaluation": {"dataset": "eval.txt", "context_length": 128, "device": "cpu"},
            "variants": [{"name": "a", "method": "bnb-int8"}],
        }
    )
    ctx = _Context(recipe, None, tmp_path, SilentReporter())
    art = tmp_path / "a"
    art.mkdir()
    manifest = bnb_manifest({**_kld_evaluation(), "schema": "llmopt.eval/3"}, version="9.0.0")
    (art / "llmopt.json").write_text(json.dumps(manifest))
    with pytest.raises(NewerArtifactError, match=r"evaluation of schema llmopt\.eval/3"):
        reusable_artifact(ctx, recipe.variants[0], art)
    del manifest["evaluation"]
    manifest["schema_version"] = 2
    (art / "llmopt.json").write_text(json.dumps(manifest))
    with pytest.raises(NewerArtifactError, match="manifest schema 2"):
        reusable_artifact(ctx, recipe.variants[0], art)
    # a number too large for an int is a damaged manifest (re-made), not a traceback
    (art / "llmopt.json").write_text(json.dumps(manifest).replace('"schema_version": 2', '"schema_version": 1e400'))
    assert reusable_artifact(ctx, recipe.variants[0], art) == (None, "its manifest is unreadable")
