"""Backends own their format: the model card's format facts come from the backend that wrote the artifact,
runners come from a registry that plugins extend like the backends' one, and every backend option is reachable
as ``-O key=value``, typed and checked against the backend's own options model."""

from __future__ import annotations

import json
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
    from llmopt.backends.base import Backend, FormatCard, LoadSnippet, save_tokenizer

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
