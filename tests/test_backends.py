"""Backends own their format: the model card's format facts come from the backend that wrote the artifact,
runners come from a registry that plugins extend like the backends' one, and every backend option is reachable
as ``-O key=value``, typed and checked against the backend's own options model."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from llmopt.artifact import Artifact
from llmopt.backends.base import describe_backend, format_card

FIXTURES = Path(__file__).parent / "fixtures"
# The format-dependent parts of the card (front matter, title, "How to use") for each built-in format, recorded
# from model_card.py before the format switches moved out of it into the backends.
RECORDED = json.loads((FIXTURES / "format_cards.json").read_text())


def _card_parts(card: str) -> dict[str, str]:
    lines = card.splitlines()
    end = lines.index("---", 1)
    how, quant = lines.index("## How to use"), lines.index("## Quantization")
    return {
        "front_matter": "\n".join(lines[1:end]),
        "title": lines[end + 4],
        "how_to_use": "\n".join(lines[how + 2 : quant - 1]),
    }


@pytest.mark.parametrize(
    "case", RECORDED, ids=[f"{c['backend']}-{c['format']}-{c['revision'] or 'main'}" for c in RECORDED]
)
def test_card_format_facts_are_the_recorded_card_text(tmp_path: Path, case: dict[str, Any]) -> None:
    """Each built-in format's card text is what it was when model_card.py switched on format names; a manifest
    whose backend is not installed (an uninstalled plugin, `myplugin`) gets a plain transformers card."""
    pytest.importorskip("huggingface_hub")
    from llmopt.model_card import render_card
    from tests.test_publish import make_artifact

    art = make_artifact(tmp_path, fmt=case["format"], backend=case["backend"], options=case["options"])
    card = render_card(Artifact.open(art), "org/smol-x", revision=case["revision"])
    assert _card_parts(card) == {k: case[k] for k in ("front_matter", "title", "how_to_use")}


@pytest.mark.parametrize(
    ("method", "options", "expected"),
    [
        ("gptq", {"bits": 3}, {"library_name": "transformers", "tags": ["gptq"], "bits": 3, "bit_width": "3-bit"}),
        ("awq", {"bits": 4}, {"library_name": "transformers", "tags": ["awq"], "bits": 4, "bit_width": "4-bit"}),
        ("bnb-int8", {}, {"tags": ["bitsandbytes"], "bits": 8, "quant_type": "int8"}),
        ("bnb-nf4", {}, {"tags": ["bitsandbytes"], "bits": 4, "quant_type": "nf4"}),
        ("bnb-fp4", {}, {"tags": ["bitsandbytes"], "bits": 4, "quant_type": "fp4"}),
        (
            "gguf",
            {"quant_type": "q4_k_m"},
            {"library_name": "gguf", "tags": ["gguf"], "bits": None, "bit_width": "~4.6 bpw", "quant_type": "q4_k_m"},
        ),
        ("gguf", {"quant_type": "q8_0"}, {"bit_width": "8.5 bpw", "quant_type": "q8_0"}),
    ],
)
def test_format_card_facts(method: str, options: dict[str, Any], expected: dict[str, Any]) -> None:
    """The typed facts a backend gives about its format, beyond what today's card prints (GGUF's type and width)."""
    backend = describe_backend(method)
    facts = format_card(method, backend.format, options, "org/x").model_dump()
    assert {k: facts[k] for k in expected} == expected


def test_format_named_bit_width_is_read_whole(tmp_path: Path) -> None:
    """`exl2-6bit` is 6-bit: the old reading dropped the '-' and took '26bit' as 26 bits (tag and title)."""
    pytest.importorskip("huggingface_hub")
    import yaml

    from llmopt.model_card import render_card
    from tests.test_publish import make_artifact

    art = make_artifact(tmp_path, fmt="exl2-6bit", backend="not-installed", options={})
    card = render_card(Artifact.open(art), "org/x")
    assert "6-bit" in yaml.safe_load(card.split("---")[1])["tags"]
    assert _card_parts(card)["title"].startswith("6-bit not-installed quantization")


def test_describe_backend_does_not_probe_the_toolchain(monkeypatch: pytest.MonkeyPatch) -> None:
    """The card and `backends --options` read what a backend says about itself; its `check()` (GGUF: a decode
    probe of the built llama.cpp) is for quantizing, and is not run for them."""
    from llmopt.backends.gguf import GGUFBackend

    def boom(self: Any) -> list[str]:
        raise AssertionError("check() must not run")

    monkeypatch.setattr(GGUFBackend, "check", boom)
    assert describe_backend("gguf").format == "gguf"
    assert format_card("gguf", "gguf", {"quant_type": "q6_k"}, "org/x").quant_type == "q6_k"


# --- plugins -------------------------------------------------------------------------------------------


def plugin_site(root: Path, entry_points: str, modules: dict[str, str]) -> Path:
    """A folder that, on sys.path/PYTHONPATH, is an installed distribution with these entry points and modules."""
    site = root / "site"
    dist = site / "llmopt_plugin_fmt-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llmopt-plugin-fmt\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, code in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(code))
    return site


COPY_BACKEND = """
    import shutil
    from pydantic import BaseModel, ConfigDict, Field
    from llmopt.backends import Backend, FormatCard, LoadSnippet

    class CopyOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        level: int = Field(3, ge=1, le=9, description="How hard to copy.")
        tag: str = Field("plain", description="A free-form label.")
        fast: bool = Field(False, description="Copy fast.")

    class CopyBackend(Backend):
        name = "copyfmt"
        format = "copyfmt"
        runner = "tinyrunner"
        Options = CopyOptions

        def quantize(self, inputs):
            for f in inputs.source.path.iterdir():
                if f.is_file() and f.suffix in (".json", ".safetensors", ".txt", ".model"):
                    shutil.copy(f, inputs.out_dir / f.name)
            return {}

        def format_card(self, options, repo_id, revision=None):
            return FormatCard(
                format=self.format, library_name="copylib", tags=["copyfmt"], bits=None, bit_width=None,
                load=[LoadSnippet(intro="With copylib:", language="bash", code=f"copylib run {repo_id}")],
            )
"""


def test_plugin_backend_writes_its_own_card_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend from another package says how its format loads; the card shows that, not a transformers guess."""
    pytest.importorskip("huggingface_hub")
    from llmopt.model_card import render_card
    from tests.test_publish import make_artifact

    entry = "[llmopt.backends]\ncopyfmt = plugin_copy:CopyBackend\n"
    site = plugin_site(tmp_path, entry, {"plugin_copy": COPY_BACKEND})
    monkeypatch.syspath_prepend(str(site))
    art = make_artifact(tmp_path, fmt="copyfmt", backend="copyfmt", options={"level": 3})
    card = render_card(Artifact.open(art), "org/smol-copy")
    parts = _card_parts(card)
    assert "library_name: copylib" in parts["front_matter"]
    assert parts["how_to_use"] == "With copylib:\n\n```bash\ncopylib run org/smol-copy\n```"
    assert "AutoModelForCausalLM" not in card


def test_card_of_a_plugin_that_no_longer_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An artifact outlives its plugin: a backend that fails to import gives the plain card, not a traceback."""
    pytest.importorskip("huggingface_hub")
    from llmopt.model_card import render_card
    from tests.test_publish import make_artifact

    site = plugin_site(
        tmp_path, "[llmopt.backends]\ncopyfmt = plugin_gone:CopyBackend\n", {"plugin_gone": "raise ImportError('gone')"}
    )
    monkeypatch.syspath_prepend(str(site))
    art = make_artifact(tmp_path, fmt="copyfmt", backend="copyfmt", options={})
    parts = _card_parts(render_card(Artifact.open(art), "org/x"))
    assert parts["how_to_use"].startswith("With transformers:")


TINY_RUNNER = """
    from llmopt.runners import BaseRunner

    class TinyRunner(BaseRunner):
        # every token costs 2 nats: a perplexity of e**2 says this runner scored, not transformers
        name = "tinyrunner"

        @classmethod
        def open(cls, request):
            runner = cls()
            runner.device, runner.dtype, runner.kernel = "cpu", "float32", "tiny-kernel"
            runner.path = request.path
            return runner

        def nll(self, windows, score_from):
            return [[2.0] * (len(w) - max(s, 1)) for w, s in zip(windows, score_from)]

        def footprint_bytes(self):
            return 1234

        def close(self):
            pass

    class NotARunner:
        pass
"""

RUNNER_ENTRY = """
    [llmopt.backends]
    copyfmt = plugin_copy:CopyBackend

    [llmopt.runners]
    tinyrunner = plugin_runner:TinyRunner
    notarunner = plugin_runner:NotARunner
    brokenrunner = plugin_broken_runner:Runner
    hf = plugin_runner:TinyRunner
"""


def runner_site(tmp_path: Path) -> Path:
    return plugin_site(
        tmp_path,
        RUNNER_ENTRY,
        {
            "plugin_copy": COPY_BACKEND,
            "plugin_runner": TINY_RUNNER,
            "plugin_broken_runner": "raise RuntimeError('runner plugin exploded')",
        },
    )


def test_plugin_runner_is_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner registered under the entry-point group `llmopt.runners` is loaded by `load_runner`; the optional
    facts it does not have are None, and timing it is a clear exit-4 error; a built-in name cannot be taken over."""
    from llmopt.errors import BackendUnavailableError, InputError
    from llmopt.runners import available_runners, load_runner, runner_class
    from llmopt.runners.hf import HFRunner

    monkeypatch.syspath_prepend(str(runner_site(tmp_path)))
    assert available_runners()["tinyrunner"] == "llmopt-plugin-fmt"
    assert available_runners()["hf"] == "builtin" and runner_class("hf") is HFRunner
    runner = load_runner("tinyrunner", tmp_path, "cpu")
    assert runner.name == "tinyrunner" and runner.kernel == "tiny-kernel"
    assert runner.compute is None and runner.placement is None
    assert runner.nll([[1, 2, 3, 4]], [2]) == [[2.0, 2.0]]
    with pytest.raises(BackendUnavailableError, match="'tinyrunner' runner cannot measure throughput"):
        runner.bench(None)
    with pytest.raises(BackendUnavailableError, match="not a llmopt BaseRunner subclass"):
        load_runner("notarunner", tmp_path, "cpu")
    with pytest.raises(BackendUnavailableError, match="runner plugin exploded"):
        load_runner("brokenrunner", tmp_path, "cpu")
    with pytest.raises(InputError, match="unknown runner 'nope'") as info:
        load_runner("nope", tmp_path, "cpu")
    assert info.value.exit_code == 2


def test_builtin_runners_are_registered() -> None:
    """hf, gptqmodel and llamacpp are registry entries like any plugin's (no if/else in load_runner)."""
    from llmopt.runners import runner_class
    from llmopt.runners.hf import GPTQModelRunner, HFRunner
    from llmopt.runners.llamacpp import LlamaCppRunner

    assert runner_class("hf") is HFRunner
    assert runner_class("gptqmodel") is GPTQModelRunner and GPTQModelRunner.loader == "gptqmodel"
    assert runner_class("llamacpp") is LlamaCppRunner


def test_plugin_backend_and_runner_end_to_end(assets: dict[str, Path], tmp_path: Path) -> None:
    """A package brings a backend and the runner that loads its output: `llmopt quantize` then `llmopt eval`
    score the artifact through the plugin's runner (its perplexity, e**2, is the runner's own), the baseline through
    transformers; `llmopt bench` of the artifact is exit 4 with the runner's reason."""
    from tests.helpers import first_layers, run_cli

    site = runner_site(tmp_path)
    model = first_layers(assets["model"], tmp_path / "smollm2-1l", 1)
    work = tmp_path / "work"
    work.mkdir()
    # the checkout under test first (run_cli's own PYTHONPATH is replaced by this one), then the plugin
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(site)])}
    made = run_cli(
        ["quantize", str(model), "-m", "copyfmt", "-o", "art", "-q",
         "-O", "level=07", "-O", "tag=007", "-O", "fast=yes"],
        cwd=work,
        env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    manifest = json.loads((work / "art" / "llmopt.json").read_text())
    assert manifest["runner"] == "tinyrunner"
    # the plugin's own options, read by their types: a text option keeps '007' (YAML made it the number 7)
    assert {k: manifest["options"][k] for k in ("level", "tag", "fast")} == {"level": 7, "tag": "007", "fast": True}
    ev = run_cli(
        ["eval", "art", "--baseline", str(model), "--dataset", str(assets["eval_text"]), "--context", "64",
         "--max-tokens", "256", "--json", "-q", "--no-kld"],  # the plugin runner computes no KL divergence
        cwd=work,
        env=env,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    report = json.loads(ev.stdout)
    assert report["artifact"]["runner"] == "tinyrunner" and report["artifact"]["kernel"] == "tiny-kernel"
    assert report["artifact"]["perplexity"] == pytest.approx(2.718281828**2, rel=1e-6)
    assert report["baseline"]["runner"] == "hf"
    bench = run_cli(["bench", "art", "-q"], cwd=work, env=env)
    assert bench.returncode == 4, bench.stderr
    assert "'tinyrunner' runner cannot measure throughput" in bench.stderr and "Traceback" not in bench.stderr


# --- options: -O key=value, read by type; `llmopt backends --options` -------------------------------------


@pytest.mark.parametrize(
    ("method", "flags", "pairs", "expected"),
    [
        ("gptq", {}, ["group_size=064"], {"group_size": 64}),  # YAML read 064 as octal: 52
        ("gptq", {}, ["bits=8", "damp-percent=.01", "sym=no"], {"bits": 8, "damp_percent": 0.01, "sym": False}),
        ("gptq", {}, ["act_group_aware=none"], {"act_group_aware": None}),
        ("gguf", {}, ["threads=none", "imatrix=on"], {"threads": None, "imatrix": "on"}),  # a file named 'on'
        ("gguf", {}, ["threads=010"], {"threads": 10}),
        ("bnb-int8", {}, ["skip_modules=lm_head,model.layers.0.mlp"],
         {"skip_modules": ["lm_head", "model.layers.0.mlp"]}),
        ("bnb-int8", {}, ["skip_modules=[lm_head]"], {"skip_modules": ["lm_head"]}),
        ("bnb-int8", {}, ["skip_modules="], {"skip_modules": []}),
        ("gguf", {"quant_type": "Q4_K_M"}, ["quant_type=q4_k_m"], {"quant_type": "q4_k_m"}),  # one type, two spellings
        ("gptq", {"bits": 4, "sym": None}, ["bits=4"], {"bits": 4, "sym": True}),
    ],
)  # fmt: skip
def test_option_values_are_read_by_their_type(
    method: str, flags: dict[str, Any], pairs: list[str], expected: dict[str, Any]
) -> None:
    """-O values are read by the option's type in the backend's options model, not guessed as YAML: base-10 numbers,
    text kept as text (a GGUF imatrix file named `on`), comma-separated lists, `none` for an option that may be
    unset; pydantic then reads numbers and booleans from the text itself."""
    from llmopt.cli.quantize import merge_options

    options = describe_backend(method).parse_options(merge_options(flags, pairs, method))
    assert {k: getattr(options, k) for k in expected} == expected


def test_flag_and_option_conflicts_compare_validated_values() -> None:
    """`--group-size 64 -O group_size=064` is one value (YAML made it 52 and refused the pair); values that differ
    once validated are still refused, naming both spellings."""
    from llmopt.cli.quantize import merge_options
    from llmopt.errors import InputError

    assert merge_options({"group_size": 64}, ["group_size=064"], "gptq") == {"group_size": 64}
    with pytest.raises(InputError, match="--group-size 64 and -O group_size=0100"):
        merge_options({"group_size": 64}, ["group_size=0100"], "gptq")
    with pytest.raises(InputError, match="--sym and -O sym=off"):
        merge_options({"sym": True}, ["sym=off"], "gptq")


def test_option_schema_lists_every_option() -> None:
    """A backend's options, with type, default and help, come from its options model."""
    schema = {o.name: o for o in describe_backend("gptq").option_schema()}
    assert set(schema) == set(describe_backend("gptq").Options.model_fields)
    assert schema["bits"].type == "2|3|4|8" and schema["bits"].default == 4
    assert schema["act_group_aware"].type == "bool | none" and schema["act_group_aware"].default is None
    bnb = {o.name: o for o in describe_backend("bnb-nf4").option_schema()}
    assert bnb["skip_modules"].type == "list[str]" and bnb["skip_modules"].default == ["lm_head"]


def test_backends_options_command(tmp_path: Path) -> None:
    """`llmopt backends --options METHOD` prints a backend's options as a table, and as JSON with --json; a plugin's
    options are listed from its own model; an unknown method is exit 2 with a suggestion."""
    from tests.helpers import run_cli

    table = run_cli(["backends", "--options", "gguf"], env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    for text in ("quant_type", "q4_k_m", "--quant-type", "threads", "int | none", "pure", "false"):
        assert text in table.stdout
    js = run_cli(["backends", "--options", "bnb-nf4", "--json"])
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert data["method"] == "bnb-nf4" and data["format"] == "bnb-4bit"
    rows = {o["name"]: o for o in data["options"]}
    assert rows["double_quant"] == {
        "name": "double_quant", "type": "bool", "default": True, "required": False,
        "flag": "--double-quant/--no-double-quant",
        "help": "Quantize the quantization constants too (QLoRA's default).",
    }  # fmt: skip
    assert rows["skip_modules"]["default"] == ["lm_head"] and rows["skip_modules"]["flag"] is None

    site = runner_site(tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), str(site)])}
    plugin = run_cli(["backends", "--options", "copyfmt", "--json"], env=env)
    assert plugin.returncode == 0, plugin.stderr
    assert [o["name"] for o in json.loads(plugin.stdout)["options"]] == ["level", "tag", "fast"]

    bad = run_cli(["backends", "--options", "gptqq"])
    assert bad.returncode == 2 and "did you mean 'gptq'" in bad.stderr and "Traceback" not in bad.stderr


def test_every_backend_flag_names_a_real_option() -> None:
    """The typed flags of `quantize` in its backend panel are exactly the ones `backends --options` names, and each
    sets an option some built-in backend has: a flag cannot drift away from the options models."""
    import typer.main

    from llmopt.cli.main import app
    from llmopt.cli.quantize import BACKEND_PANEL, OPTION_FLAGS

    command = typer.main.get_command(app).commands["quantize"]  # type: ignore[attr-defined]
    panel = {
        p.name: "/".join([*p.opts, *p.secondary_opts])
        for p in command.params
        if getattr(p, "rich_help_panel", None) == BACKEND_PANEL and p.name != "option"
    }
    assert {(k if k != "awq_version" else "version"): v for k, v in panel.items()} == OPTION_FLAGS
    methods = ("gptq", "awq", "bnb-int8", "bnb-nf4", "gguf")
    fields = {f for m in methods for f in describe_backend(m).Options.model_fields}
    assert set(OPTION_FLAGS) <= fields


def test_recipe_planning_does_not_probe_the_toolchain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validating a recipe and asking whether a variant needs calibration read the backend's options model; they do
    not run its `check()` (GGUF's: a smoke decode of llama.cpp on a CPU it has not seen, up to minutes)."""
    from llmopt.backends.gguf import GGUFBackend
    from llmopt.recipe import VariantSpec

    def boom(self: Any) -> list[str]:
        raise AssertionError("check() must not run")

    monkeypatch.setattr(GGUFBackend, "check", boom)
    variant = VariantSpec(name="q4", method="gguf", options={"quant_type": "q4_k_m", "imatrix": "auto"})
    assert variant.needs_calibration() is True
    assert variant.backend_options()["quant_type"] == "q4_k_m"


def test_option_text_of_other_types_reaches_the_model_as_text() -> None:
    """A plugin's path, enum or mapping option: text for the first two (pydantic reads them; YAML made `064` a
    number), YAML for a mapping."""
    import enum

    from pydantic import BaseModel, ConfigDict

    from llmopt.backends.options import read_option

    class Kind(enum.Enum):
        A = "064"

    class Opts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        where: Path = Path(".")
        kind: Kind = Kind.A
        extra: dict[str, int] = {}

    read = {k: read_option(Opts, k, v) for k, v in {"where": "064", "kind": "064", "extra": "{a: 1}"}.items()}
    assert read == {"where": "064", "kind": "064", "extra": {"a": 1}}
    assert Opts.model_validate(read) == Opts(where=Path("064"), kind=Kind.A, extra={"a": 1})


def test_options_and_card_facts_import_no_heavy_library() -> None:
    """`backends --options` and the card's format facts read class attributes and options models only."""
    import subprocess
    import sys

    code = textwrap.dedent(
        """
        import sys
        from llmopt.cli import main
        from llmopt.backends import format_card
        for method in ("gptq", "awq", "hqq", "bnb-int8", "bnb-nf4", "bnb-fp4", "gguf"):
            try:
                main(["backends", "--options", method, "--json"])
            except SystemExit as e:
                assert e.code in (0, None), (method, e.code)
        format_card("gguf", "gguf", {"quant_type": "q4_k_m"}, "org/x")
        format_card("gptq", "gptq", {"bits": 4}, "org/x")
        libraries = ("torch", "transformers", "gptqmodel", "bitsandbytes", "llama_cpp", "hqq")
        heavy = [m for m in libraries if m in sys.modules]
        assert not heavy, heavy
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
