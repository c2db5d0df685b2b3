"""What a hostile tester found in the session that added tasks, serving in recipes and the cost optimizer: each
case refused with its exit code and one message, or reported truthfully."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmopt.errors import EXIT_INPUT
from llmopt.recipe import RecipeError, load_recipe
from tests.helpers import run_cli
from tests.test_recipe import GOOD


def _recipe_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        # a boolean or a string where a number belongs was read as 1 / 0.9
        ("  max_ppl: 100\n", "  max_ppl: 100\n  min_recovery: true\n", "min_recovery"),
        ("  max_ppl: 100\n", "  max_ppl: 100\n  min_recovery: '0.9'\n", "min_recovery"),
        ("  device: cpu\n", "  device: cpu\n  tasks: [a]\n  task_limit: true\n", "task_limit"),
        ("  device: cpu\n", "  device: cpu\n  tasks: [a]\n  task_limit: 2.0\n", "task_limit"),
        ("  device: cpu\n", "  device: cpu\n  tasks: [a]\n  task_limit: 9223372036854775808\n", "task_limit"),
        # a task limit without tasks was silently ignored
        ("  device: cpu\n", "  device: cpu\n  task_limit: 8\n", "no tasks are given"),
    ],
)
def test_recipe_refuses_wrong_task_and_recovery_values(tmp_path: Path, old: str, new: str, says: str) -> None:
    assert old in GOOD
    assert says in _recipe_error(tmp_path, GOOD.replace(old, new, 1))


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--slo", " "], "--slo gives no target"),
        (["--slo", ""], "--slo gives no target"),
        (["--slo", "ttft_p95=500ms", "--gpu-hourly-cost", "nan"], "is not a price"),
    ],
)
def test_estimate_refuses_an_empty_slo_and_a_price_that_is_not_a_number(
    tmp_path: Path, extra: list[str], says: str
) -> None:
    """`--slo " "` was an AssertionError traceback; `--gpu-hourly-cost nan` printed "$nan" and wrote bare NaN."""
    report = tmp_path / "report.json"
    report.write_text("{}")
    done = run_cli(["estimate", "--report", str(report), "--rate", "1", *extra], cwd=tmp_path, timeout=120)
    assert done.returncode == EXIT_INPUT, done.stderr[-2000:]
    assert says in done.stderr and "Traceback" not in done.stderr


def test_gate_text_of_a_perplexity_that_went_down() -> None:
    """'perplexity +-16.80% vs FP16' when the artifact scored lower than FP16."""
    from llmopt.evaluate.gate import apply_gate
    from llmopt.specs import GateSpec
    from tests.test_types import BASE, stored

    report = stored(BASE).model_copy(update={"delta_pct": -16.8})
    check = apply_gate(GateSpec(max_ppl_increase_pct=50), report).checks[0]
    assert "perplexity -16.80% vs FP16" in check.message and "+-" not in check.message


def test_run_summary_prints_install_lines_as_text() -> None:
    """rich read 'transformers[serving]' in a hint as markup and printed "pip install 'transformers'"."""
    import io

    from rich.console import Console

    import llmopt.cli.run as run_cli_module
    from llmopt.results import RunReport, VariantError, VariantOutcome

    variant = VariantOutcome(
        name="v", method="bnb-int8", status="error",
        error=VariantError(stage="serve", type="BackendUnavailableError", exit_code=4,
                           message="transformers serve is missing [serving] extras",
                           hint="pip install 'transformers[serving]'"),
    )  # fmt: skip
    buf = io.StringIO()
    saved = run_cli_module.stderr
    run_cli_module.stderr = Console(file=buf, width=200)
    try:
        run_cli_module.render_run(RunReport(variants=[variant]))
    finally:
        run_cli_module.stderr = saved
    assert "pip install 'transformers[serving]'" in buf.getvalue()
    assert "[serving] extras" in buf.getvalue()
