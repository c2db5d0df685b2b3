"""What a hostile tester found in the fourth round: one-window evaluations, run-wide checks that came after the first
quantization, the Hub unreachable for lm-eval tasks, a local task shadowing a built-in one, unbounded or ignored
estimate options, an empty publish tag, calibration text ignored in silence, third-party progress bars. Each case
is refused with its exit code and one message naming the next step, or reported truthfully."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmopt.errors import EXIT_ARTIFACT, EXIT_INPUT, EXIT_UNAVAILABLE, DataError
from tests.helpers import first_layers, run_cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-layer SmolLM2 and its bitsandbytes int8 artifact (never evaluated); tests copy the artifact."""
    pytest.importorskip("bitsandbytes")
    from llmopt import api

    root = tmp_path_factory.mktemp("fourth")
    model = first_layers(assets["model"], root / "m2", 2)
    art = api.quantize(str(model), "bnb-int8", root / "int8", device="cpu")
    return {"model": model, "artifact": art.path, "text": assets["eval_text"]}


def _copy_artifact(small: dict[str, Path], dest: Path) -> Path:
    import shutil

    shutil.copytree(small["artifact"], dest)
    return dest


# --- 1. a one-window evaluation ------------------------------------------------------------------------------


def test_one_window_hint_names_only_what_helps() -> None:
    """With exactly one window's worth of tokens, a smaller stride cuts no second window: only --context is named."""
    from llmopt.evaluate.perplexity import make_windows, require_error_bar

    exact = make_windows(range(128), 128, 64)
    assert len(exact) == 1
    with pytest.raises(DataError) as info:
        require_error_bar(exact, 128, 128, 64)
    assert "only one scoring window" in info.value.message and "two or more windows" in info.value.message
    assert "lower --context (" in str(info.value.hint) and "--stride" not in str(info.value.hint)
    longer = make_windows(range(130), 128, 128)  # 130 tokens: the second window is shifted back, two windows
    require_error_bar(longer, 130, 128, 128)
    one = make_windows(range(100), 64, 64, bos_id=0)  # 100 tokens, BOS: 63 + 37 -> two windows
    require_error_bar(one, 100, 64, 64, add_bos=True)


def test_one_window_evaluation_is_refused_before_scoring(small: dict[str, Path], tmp_path: Path) -> None:
    """128 tokens at --context 128 make one window: its stderr was stored as NaN (null in the manifest), and publish
    then refused the manifest, asking to evaluate again, which stored the same. Now refused first (exit 2), with the
    way out; nothing is written into the manifest."""
    art = _copy_artifact(small, tmp_path / "int8")
    before = (art / "llmopt.json").read_text()
    r = run_cli(["eval", str(art), "--baseline", str(small["model"]), "--dataset", str(small["text"]),
                 "--max-tokens", "128", "--context", "128", "--device", "cpu", "--no-kld"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "only one scoring window (128 tokens, --context 128" in r.stderr and "Traceback" not in r.stderr
    assert "lower --context" in r.stderr and "FP16 baseline" not in r.stderr  # refused before any scoring
    assert (art / "llmopt.json").read_text() == before


def test_a_stored_one_window_evaluation_at_publish(
    small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An artifact evaluated on one window by an older llmopt (stderr null in its manifest): publish says why it
    cannot go (exit 5) and how to evaluate it so that it can; evaluating it again that way makes it publishable."""
    from llmopt import api
    from llmopt.evaluate import perplexity
    from llmopt.specs import EvalSpec

    art = _copy_artifact(small, tmp_path / "int8")
    monkeypatch.setattr(perplexity, "require_error_bar", lambda *a, **k: None)  # what older versions did
    spec = EvalSpec(dataset=str(small["text"]), max_tokens=128, context_length=128, device="cpu", kld=False)
    api.evaluate(art, str(small["model"]), spec, use_cache=False)
    monkeypatch.undo()
    stored = json.loads((art / "llmopt.json").read_text())["evaluation"]
    assert stored["settings"]["windows"] == 1 and stored["artifact"]["stderr"] is None

    r = run_cli(["publish", str(art), "org/int8", "--dry-run"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == EXIT_ARTIFACT, r.stderr[-2000:]
    assert "single window" in r.stderr and "no error bar" in r.stderr and "smaller --context" in r.stderr
    assert "Traceback" not in r.stderr

    args = ["eval", str(art), "--baseline", str(small["model"]), "--dataset", str(small["text"]), "--device", "cpu",
            "--no-kld", "--max-ppl-increase", "1000", "-q"]  # fmt: skip
    again = run_cli([*args, "--max-tokens", "128", "--context", "128"], cwd=tmp_path)
    assert again.returncode == EXIT_INPUT and "only one scoring window" in again.stderr  # no loop: the way out
    fixed = run_cli([*args, "--max-tokens", "256", "--context", "128"], cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    r = run_cli(["publish", str(art), "org/int8", "--dry-run"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]


def _recipe(tmp_path: Path, model: Path, text: Path, extra_eval: str = "", variants: str = "") -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model:\n  source: {model}\nevaluation:\n  dataset: {text}\n  context_length: 64\n  device: cpu\n"
        f"  kld: false\n{extra_eval}variants:\n" + (variants or "  - name: int8\n    method: bnb-int8\n")
    )
    return recipe


def test_a_one_window_recipe_stops_before_quantizing(small: dict[str, Path], tmp_path: Path) -> None:
    """In `llmopt run` the window count is known from the model's tokenizer before any variant: exit 2 there."""
    recipe = _recipe(tmp_path, small["model"], small["text"], "  max_tokens: 64\n")
    r = run_cli(["run", str(recipe), "-o", str(tmp_path / "out")], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "only one scoring window (64 tokens, --context 64" in r.stderr and "Traceback" not in r.stderr
    assert "evaluation.context_length" in r.stderr
    assert not (tmp_path / "out" / "artifacts").exists()


# --- 2. a serving prompts file that cannot be used ------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "content", "says"),
    [
        ("missing", None, "does not exist or is not a file"),
        ("empty", b"\n  \n", "holds no prompts"),
        ("not text", b"\xff\xfe\x00binary", "cannot be read as UTF-8 text"),
    ],
)
def test_a_bad_serving_prompts_file_stops_the_run_before_quantizing(
    small: dict[str, Path], tmp_path: Path, case: str, content: bytes | None, says: str
) -> None:
    """`evaluation.serving.prompts_file` missing, empty or unreadable was found only when the first variant was served,
    after quantizing and evaluating it: now exit 2 in the run's checks, naming the key and the file."""
    prompts = tmp_path / "prompts.txt"
    if content is not None:
        prompts.write_bytes(content)
    serving = f"  serving: {{rates: [1], requests: 2, prompts_file: {prompts}}}\n"
    recipe = _recipe(tmp_path, small["model"], small["text"], "  max_tokens: 256\n" + serving)
    r = run_cli(["run", str(recipe), "-o", str(tmp_path / "out")], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, (case, r.stderr[-2000:])
    assert "evaluation.serving.prompts_file" in r.stderr and str(prompts) in r.stderr and says in r.stderr, case
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "artifacts").exists()


# --- 3. lm-eval's own tasks with the Hub unreachable ----------------------------------------------------------


def test_a_hub_task_with_the_hub_unreachable_fails_fast_with_the_network_code(
    small: dict[str, Path], tmp_path: Path
) -> None:
    """With the Hub not answering, `--tasks arc_easy` printed ~25 s of datasets' "Retrying in 8s" lines and exited 2;
    publish exits 4 for the same cause. Now one quick check of the Hub, the data read from the cache alone (offline
    mode), and exit 4 naming the Hub, with no retries."""
    pytest.importorskip("lm_eval", reason="needs the tasks extra: pip install -e '.[tasks]'")
    import time

    env = {"HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port: connection refused
           "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}  # fmt: skip
    start = time.monotonic()
    r = run_cli(["eval", str(small["artifact"]), "--baseline", str(small["model"]), "--dataset", str(small["text"]),
                 "--max-tokens", "256", "--context", "128", "--device", "cpu", "--no-kld", "--tasks", "arc_easy",
                 "--task-limit", "4"], cwd=tmp_path, env=env)  # fmt: skip
    took = time.monotonic() - start
    assert r.returncode == EXIT_UNAVAILABLE, r.stderr[-2000:]
    assert "the Hugging Face Hub (http://127.0.0.1:9) did not answer" in r.stderr and "local task file" in r.stderr
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr
    assert took < 90, took  # lm-eval's task index takes 10-30 s of it; the retries alone took ~25 s


def test_a_hub_task_in_offline_mode_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE set by the user (as publish reads it: exit 2, "unset it"), and the data not cached."""
    pytest.importorskip("lm_eval", reason="needs the tasks extra: pip install -e '.[tasks]'")
    from llmopt.evaluate import tasks

    monkeypatch.setattr(tasks, "_hub_reachable", lambda *_: pytest.fail("no request to the Hub in offline mode"))
    with pytest.raises(DataError) as info:
        tasks.plan_tasks(["arc_easy"], 4)
    assert info.value.exit_code == EXIT_INPUT and "offline mode" in info.value.message
    assert "Unset them" in str(info.value.hint) and "local task file" in str(info.value.hint)


# --- 4. a local task under the name of one of lm-eval's own -----------------------------------------------------

CLOZE_DIR = ROOT / "tests" / "data" / "britannica_cloze"


def _local_task_named(folder: Path, name: str) -> Path:
    import shutil

    folder.mkdir(parents=True)
    shutil.copy(CLOZE_DIR / "britannica_cloze.jsonl", folder / "britannica_cloze.jsonl")
    text = (CLOZE_DIR / "britannica_cloze.yaml").read_text()
    assert "task: britannica_cloze\n" in text
    (folder / "t.yaml").write_text(text.replace("task: britannica_cloze\n", f"task: {name}\n"))
    return folder / "t.yaml"


@pytest.mark.parametrize("with_index", [False, True])
def test_a_local_task_named_like_a_built_in_one_is_refused(tmp_path: Path, with_index: bool) -> None:
    """A local task file saying `task: arc_easy` was scored and reported (and would be published) as lm-eval's
    arc_easy. Refused (exit 2) with the reason and the rename, whether lm-eval's full index was built (a task name
    was given too) or not (local files only: its task files are read for the names)."""
    pytest.importorskip("lm_eval", reason="needs the tasks extra: pip install -e '.[tasks]'")
    from llmopt.errors import InputError
    from llmopt.evaluate.tasks import plan_tasks

    local = _local_task_named(tmp_path / "mine", "arc_easy")
    with pytest.raises(InputError) as info:
        plan_tasks(["hellaswag", str(local)] if with_index else [str(local)], 4)
    err = info.value
    assert err.exit_code == EXIT_INPUT and f"--tasks {local}: its task name 'arc_easy'" in err.message
    assert "lm-eval's own task" in err.message and "name a task's scores by its name alone" in err.message
    assert "task: arc_easy_local" in str(err.hint)


def test_two_local_tasks_of_one_name_are_refused(tmp_path: Path) -> None:
    """Two local files with the same task name: one replaced the other's scores in the results."""
    pytest.importorskip("lm_eval", reason="needs the tasks extra: pip install -e '.[tasks]'")
    from llmopt.errors import InputError
    from llmopt.evaluate.tasks import plan_tasks

    a = _local_task_named(tmp_path / "a", "my_cloze")
    b = _local_task_named(tmp_path / "b", "my_cloze")
    with pytest.raises(InputError, match=f"is also the task of --tasks {a}"):
        plan_tasks([str(a), str(b)], 4)
    assert plan_tasks([str(a)], 4).names == ["my_cloze"]  # a name of its own is fine


# --- 5, 6. `llmopt estimate`: --gpus unbounded, at_rate in --slo ignored ------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run report with serving measured at 1, 2 and 4 req/s on a stub server (fast: TTFT 50 ms)."""
    from tests.servestub import StubServer
    from tests.test_serving_recipe import _measure, _run_report

    with StubServer(ttft=0.05, itl=0.01) as stub:
        fast = _measure(stub, [1.0, 2.0, 4.0])
    return _run_report(tmp_path_factory.mktemp("served"), fast, fast)


def _estimate(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from llmopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["estimate", *args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.mark.parametrize(
    ("gpus", "says"),
    [
        ("1e20", "is not a list of GPU counts"),
        ("100000000000000000000", "a GPU count is a whole number from 1 to 4096"),
        ("1,8192", "--gpus 8192: a GPU count is a whole number from 1 to 4096"),
        ("0", "--gpus 0: a GPU count"),
        ("-2", "--gpus -2: a GPU count"),
        (" , ", "--gpus gives no GPU count"),
    ],
)
def test_estimate_bounds_the_gpu_counts(served: Path, capsys: pytest.CaptureFixture[str], gpus: str, says: str) -> None:
    """`--gpus 100000000000000000000` was planned for (replicas beyond any deployment): now 1 to 4096 each, exit 2."""
    code, _, err = _estimate(["--report", str(served), "--slo", "ttft_p95=200ms", "--rate", "2",
                              "--gpus", gpus], capsys)  # fmt: skip
    assert code == EXIT_INPUT and says in err and "Traceback" not in err, err


def test_estimate_of_a_model_refuses_gpus_it_would_ignore(capsys: pytest.CaptureFixture[str]) -> None:
    """`llmopt estimate MODEL --gpus 1e20` exited 0: --gpus belongs to the serving plan and was silently ignored."""
    config = ROOT / "tests" / "fixtures" / "configs" / "llama-3.1-8b.json"
    code, _, err = _estimate([str(config), "--gpus", "1e20"], capsys)
    assert code == EXIT_INPUT and "--gpus picks the GPU counts of a serving plan" in err, err


def test_estimate_reads_at_rate_in_the_slo_as_the_rate(served: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--slo ...,at_rate=4` was ignored (the plan was for --rate alone): at_rate now stands for --rate, and the two
    disagreeing, or at_rate empty or not a number, is exit 2."""
    base = ["--report", str(served), "--json"]
    code, out, err = _estimate([*base, "--slo", "ttft_p95=200ms,at_rate=4"], capsys)
    assert code == 0, err
    by_slo = json.loads(out)
    code, out, _ = _estimate([*base, "--slo", "ttft_p95=200ms", "--rate", "4"], capsys)
    assert code == 0 and by_slo["rate"] == 4.0 and by_slo["options"] == json.loads(out)["options"]
    code, _, err = _estimate([*base, "--slo", "ttft_p95=200ms,at_rate=4", "--rate", "2"], capsys)
    assert code == EXIT_INPUT and "at_rate=4 and --rate 2 name two different rates" in err, err
    code, _, _ = _estimate([*base, "--slo", "ttft_p95=200ms,at_rate=2", "--rate", "2"], capsys)
    assert code == 0  # the same rate twice
    for bad, says in (("at_rate=", "is not a number"), ("at_rate=nan", "must be a positive number"),
                      ("min_goodput=inf", "must be a positive number")):  # fmt: skip
        code, _, err = _estimate([*base, "--slo", f"ttft_p95=200ms,{bad}", "--rate", "2"], capsys)
        assert code == EXIT_INPUT and says in err, (bad, err)


# --- 7. an empty publish tag ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["folder", "gguf-one-repo"])
@pytest.mark.parametrize("tag", ["", "  ", "two\nlines"])
def test_publish_refuses_an_empty_tag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, tag: str
) -> None:
    """`publish ... --tag ''` went into the card's metadata as an empty tag: exit 2 before anything is read."""
    from tests.test_publish import make_artifact
    from tests.test_publish import run_cli as publish_cli

    art = make_artifact(tmp_path)
    code = publish_cli(["publish", str(art), "org/smol-int8", "--dry-run", "--layout", layout, "--tag", "ok",
                        "--tag", tag])  # fmt: skip
    err = capsys.readouterr().err
    assert code == EXIT_INPUT and f"--tag {tag!r}" in err and "Traceback" not in err, err
    assert publish_cli(["publish", str(art), "org/smol-int8", "--dry-run", "--tag", "my-tag"]) == 0
    assert "- my-tag" in capsys.readouterr().out  # a real tag still goes onto the card


def test_recipe_refuses_an_empty_publish_tag(tmp_path: Path) -> None:
    from llmopt.recipe import RecipeError, load_recipe
    from tests.test_recipe import GOOD

    path = tmp_path / "r.yaml"
    assert GOOD.endswith("  organization: test-org\n")
    path.write_text(GOOD + "  tags: [good, '']\n")
    with pytest.raises(RecipeError, match="tag '' is empty"):
        load_recipe(path)


# --- 10. gguf_repo reached into hub's private helpers -----------------------------------------------------------


def test_no_module_uses_the_private_names_of_hub() -> None:
    """gguf_repo.py imported `_hub_call`, `_endpoint` and called `hub._api()`, `hub._require_hub()`: what another module
    uses is public (hub_call, hub_endpoint, hub_api, require_hub), so a rename inside hub.py cannot break it."""
    import ast

    offenders = []
    for path in sorted((ROOT / "llmopt").rglob("*.py")):
        if path.name == "hub.py" and path.parent.name == "llmopt":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "llmopt.hub":
                offenders += [f"{path.name}: from llmopt.hub import {a.name}" for a in node.names if a.name[0] == "_"]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hub":
                offenders += [f"{path.name}: hub.{node.attr}"] if node.attr.startswith("_") else []
    assert offenders == []


# --- 8. calibration text given to a method that reads none ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "options", "says"),
    [
        ("hqq", {}, "hqq is calibration-free"),
        ("bnb-int8", {}, "bnb-int8 is calibration-free"),
        ("bnb-nf4", {}, "bnb-nf4 is calibration-free"),
        ("gguf", {"quant_type": "q8_0"}, "gguf with imatrix=none reads no calibration text"),
        ("llmc-fp8-dynamic", {}, "llmc-fp8-dynamic is calibration-free"),
    ],
)
def test_calibration_text_for_a_calibration_free_method_is_refused(
    tmp_path: Path, method: str, options: dict[str, str], says: str
) -> None:
    """`quantize -m hqq --calibration FILE` ignored the text in silence (so did bnb and gguf without an imatrix):
    exit 2 saying it would be ignored, before any work; nothing is written."""
    from llmopt import api
    from llmopt.backends import get_backend
    from llmopt.errors import InputError, LlmoptError
    from tests.helpers import fake_model

    try:
        get_backend(method, require_usable=True)
    except LlmoptError as exc:
        pytest.skip(f"{method} not usable here: {exc.message}")
    model = fake_model(tmp_path / "m")
    (tmp_path / "calib.txt").write_text("Some calibration text. " * 200)
    with pytest.raises(InputError) as info:
        api.quantize(str(model), method, tmp_path / "out", options=options, calibration=str(tmp_path / "calib.txt"),
                     device="cpu")  # fmt: skip
    assert info.value.exit_code == EXIT_INPUT and says in info.value.message and "ignored" in info.value.message
    assert "Drop --calibration" in str(info.value.hint)
    assert not (tmp_path / "out").exists()


# --- 9. llm-compressor's progress bars ----------------------------------------------------------------------------


def test_third_party_progress_bars_are_off_inside_quiet_progress_bars(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`quantize -m llmc-*` printed llm-compressor's tqdm bars ("(3/31): Calibrating", "Preparing cache") and
    compressed-tensors' "Compressing model" through llmopt's output. llm-compressor pins another transformers, so its
    calls are imitated: a class imported by name beforehand (as its modules do), tqdm.auto, datasets' subclass."""
    from tqdm import tqdm as imported_before  # llmcompressor/pipelines/sequential/pipeline.py: from tqdm import tqdm
    from tqdm.auto import tqdm as auto_tqdm

    from llmopt._thirdparty import quiet_progress_bars

    monkeypatch.delenv("LLMOPT_DEBUG", raising=False)
    monkeypatch.delenv("LLMOPT_THIRD_PARTY_LOGS", raising=False)

    def bars() -> list[int]:
        got = list(imported_before(range(5), desc="(1/31): Calibrating", mininterval=0))
        got += list(auto_tqdm(range(3), desc="Preparing cache", mininterval=0))
        with imported_before(total=4, desc="Compressing model", mininterval=0) as bar:
            bar.update(4)
        try:
            from datasets.utils.tqdm import tqdm as datasets_tqdm
        except ImportError:
            return got
        return got + list(datasets_tqdm(range(2), desc="Map", mininterval=0))

    with quiet_progress_bars() as quieted:
        inside = bars()
    assert quieted and inside[:8] == [0, 1, 2, 3, 4, 0, 1, 2]  # every item still goes through
    assert capsys.readouterr().err == ""
    bars()  # afterwards, and with third-party logs asked for, the bars are back
    assert "Calibrating" in capsys.readouterr().err
    monkeypatch.setenv("LLMOPT_THIRD_PARTY_LOGS", "1")
    with quiet_progress_bars() as quieted:
        bars()
    assert not quieted and "Compressing model" in capsys.readouterr().err


def test_llmc_quantize_runs_llm_compressor_inside_quiet_progress_bars() -> None:
    """The llmc backend's oneshot and save_pretrained run inside the quieting (llm-compressor is not installable next
    to this transformers, so its call site is read)."""
    import inspect

    from llmopt.backends import llmc

    source = inspect.getsource(llmc._LlmcBackend.quantize)
    assert source.count("quiet_progress_bars()") == 2
    assert source.index("quiet_progress_bars()") < source.index("oneshot(model=")
    assert source.rindex("quiet_progress_bars()") < source.index("save_pretrained(")


@pytest.mark.parametrize("text", ["a: &a [*a]\n", "name: x\nb: &b {c: *b}\n"])
def test_a_recursive_yaml_alias_is_one_clear_error(tmp_path: Path, text: str) -> None:
    """`a: &a [*a]` gave ~3,000 lines of RecursionError traceback (exit 1)."""
    from llmopt.errors import RecipeError
    from llmopt.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match="alias refers to the anchor that contains it"):
        load_recipe(path)


def test_an_alias_used_twice_is_still_fine(tmp_path: Path) -> None:
    from llmopt.recipe import _yaml_with_lines

    data, _ = _yaml_with_lines("x: &o {a: 1}\ny: *o\nz: [*o, *o]\n", "r.yaml")
    assert data == {"x": {"a": 1}, "y": {"a": 1}, "z": [{"a": 1}, {"a": 1}]}


# --- speed settings that cannot work, found before any work (fifth round) ----------------------------------


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--decode-mode", "graph"], "--decode-mode graph needs a CUDA GPU"),
        (["--decode-mode", "compile"], "--decode-mode compile needs a CUDA GPU"),
        (["--gen-len", "100000000"], "the model has 8192 (max_position_embeddings)"),
        (["--prompt-lens", "20000", "--gen-len", "4"], "the model has 8192"),
    ],
)
def test_bench_refuses_speed_settings_that_cannot_run_before_loading(
    small: dict[str, Path], tmp_path: Path, flags: list[str], says: str
) -> None:
    """A hostile tester's `bench --decode-mode graph` on a CPU measured for 105 s before exit 2, and
    `--gen-len 100000000` tried to allocate 77 GB, then exit 1 pointing to a report.json that does not exist."""
    r = run_cli(["bench", str(small["model"]), *flags, "--json-file", "b.json"], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert says in r.stderr and "Traceback" not in r.stderr
    assert "throughput of" not in r.stderr  # no measurement process was started
    assert not (tmp_path / "b.json").exists()


def test_eval_refuses_a_cpu_graph_mode_before_scoring(small: dict[str, Path], tmp_path: Path) -> None:
    art = _copy_artifact(small, tmp_path / "int8")
    r = run_cli(["eval", str(art), "--baseline", str(small["model"]), "--dataset", str(small["text"]),
                 "--max-tokens", "256", "--context", "64", "--throughput", "--decode-mode", "graph"],
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "needs a CUDA GPU" in r.stderr and "perplexity" not in r.stderr


def test_a_recipe_with_a_cpu_graph_mode_stops_before_quantizing(small: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, small["model"], small["text"], "  throughput: {decode_mode: graph}\n")
    r = run_cli(["run", str(recipe), "-o", str(tmp_path / "out")], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "needs a CUDA GPU" in r.stderr and "evaluation.throughput.decode_mode" in r.stderr
    assert not (tmp_path / "out" / "artifacts").exists()


def test_a_second_run_into_the_same_folder_is_refused_at_once(small: dict[str, Path], tmp_path: Path) -> None:
    """Two `llmopt run -o conc` 3 s apart: the second went on beside the first and the last report.json written won."""
    from llmopt.outputs import output_lock

    recipe = _recipe(tmp_path, small["model"], small["text"])
    out = tmp_path / "runs" / "conc"
    out.parent.mkdir()
    with output_lock(out):  # the first run, holding its folder
        r = run_cli(["run", str(recipe), "-o", str(out)], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "another llmopt process" in r.stderr and "is writing" in r.stderr
    assert not out.exists()  # nothing of the second run's


def test_a_task_whose_answer_field_is_missing_is_refused_before_any_model(tmp_path: Path) -> None:
    """`doc_to_target: labelz` (no such field) passed the checks and scored 0 for FP16 and the artifact, exit 0."""
    pytest.importorskip("lm_eval")
    import shutil

    from llmopt.evaluate.tasks import plan_tasks

    src = ROOT / "tests" / "data" / "britannica_cloze"
    shutil.copy(src / "britannica_cloze.jsonl", tmp_path)
    yaml_text = (src / "britannica_cloze.yaml").read_text().replace("doc_to_target: label", "doc_to_target: labelz")
    (tmp_path / "bad.yaml").write_text(yaml_text)
    with pytest.raises(DataError, match="'labelz', which is not one of its 4 choices"):
        plan_tasks([str(tmp_path / "bad.yaml")], None)


def test_paths_that_are_not_artifacts_are_bad_input(small: dict[str, Path], tmp_path: Path) -> None:
    """README's exit codes: a wrong path is 2 (it was 5, "artifact unfinished or mismatched"); a run folder given
    where one artifact is wanted names its artifacts; a run without GGUF variants under --layout gguf-one-repo is
    2, not 3 ("gate failed": no gate failed)."""
    run = tmp_path / "run"
    _copy_artifact(small, run / "artifacts" / "int8")
    (run / "report.json").write_text("{}")
    r = run_cli(["eval", "nope", "--baseline", str(small["model"]), "--dataset", str(small["text"])], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT and "nope is not an artifact folder" in r.stderr, r.stderr[-2000:]
    r = run_cli(["publish", str(run), "me/x", "--dry-run"], cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "is the folder of a whole `llmopt run`" in r.stderr and "artifacts/NAME (int8)" in r.stderr
    r = run_cli(["publish", str(run), "me/x", "--layout", "gguf-one-repo", "--dry-run"], cwd=tmp_path,
                env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert r.returncode == EXIT_INPUT and "holds no GGUF artifact" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("flags", [["--decode-mode", "eager"], ["--repetitions", "3"], ["--warmup", "0"]])
def test_speed_flags_without_throughput_are_refused_not_ignored(tmp_path: Path, flags: list[str]) -> None:
    """`eval ... --decode-mode eager` without --throughput ran and ignored the flag (exit 0), where
    `--min-decode-speedup` without it was refused."""
    r = run_cli(["eval", "a", "--baseline", "b", "--dataset", "c", *flags], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT and "only apply to throughput" in r.stderr, r.stderr[-2000:]
    assert flags[0] in r.stderr


def test_report_merge_never_replaces_its_input_and_offers_no_missing_option(tmp_path: Path) -> None:
    """`report merge out/report.json -o out` replaced the run's own report; into a folder with other files, its
    hint said to pass --overwrite, which `report merge` does not have."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ROOT / "docs" / "results" / "run-cpu-2" / "report.json", run / "report.json")
    before = (run / "report.json").read_bytes()
    r = run_cli(["report", "merge", str(run / "report.json"), "-o", str(run)], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT and "one of the reports to merge" in r.stderr, r.stderr[-2000:]
    assert (run / "report.json").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = run_cli(["report", "merge", str(run / "report.json"), "-o", str(other)], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT and "--overwrite" not in r.stderr, r.stderr[-2000:]


def test_bench_checks_an_artifacts_hashes_first(small: dict[str, Path], tmp_path: Path) -> None:
    """`bench` measured an artifact whose files no longer matched its manifest (exit 0); eval refuses it (exit 5)."""
    art = _copy_artifact(small, tmp_path / "int8")
    cfg = art / "config.json"
    cfg.write_text(cfg.read_text().replace("{", '{"x": 1, ', 1))
    r = run_cli(["bench", str(art), "--gen-len", "2", "--batch-sizes", "1", "--prompt-lens", "8"], cwd=tmp_path)
    assert r.returncode == EXIT_ARTIFACT, r.stderr[-2000:]
    assert "throughput of" not in r.stderr


def test_a_cached_baseline_names_the_model_folder_of_this_evaluation(
    small: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FP16 cache is keyed by the weights: the same model from another folder hit the entry and reported the
    folder that wrote it, so `llmopt run` with that folder never reused its evaluation ("baseline changed"); found
    as a leak between two tests whose cut models were the same weights."""
    import shutil

    from llmopt import api
    from llmopt.specs import EvalSpec

    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "copy-of-model"
    shutil.copytree(small["model"], other)
    spec = EvalSpec(dataset=str(small["text"]), max_tokens=256, context_length=128, device="cpu", kld=False)
    first = api.evaluate(_copy_artifact(small, tmp_path / "a"), str(small["model"]), spec)
    second = api.evaluate(_copy_artifact(small, tmp_path / "b"), str(other), spec)
    assert first.baseline.cached is False and second.baseline.cached is True
    assert second.baseline.model == str(other)
    assert second.baseline.perplexity == first.baseline.perplexity
