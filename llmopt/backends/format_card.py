"""What a format says about itself to the model card: typed facts a backend gives (``Backend.format_card``).

The card (llmopt/model_card.py) renders these; it never switches on format names, so a backend from another package
brings its own "How to use" section.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LoadSnippet(BaseModel):
    """One way to load or serve a published artifact, as its model card shows it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    intro: str = Field(description="The line above the code, e.g. 'With vLLM:'.")
    language: str = Field(description="The code block's language: python or bash.")
    code: str = Field(description="The code, without fences.")


class FormatCard(BaseModel):
    """What an artifact's format says about itself to the model card (and anyone else who asks).

    The backend that wrote the artifact makes it (``Backend.format_card``), so no caller switches on format names.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    format: str
    library_name: str | None = Field(description="The Hub's library_name: 'transformers', or None (GGUF).")
    tags: list[str] = Field(description="The format's own tags (its family, e.g. 'bitsandbytes').")
    bits: int | None = Field(description="Bits per weight when every quantized weight has the same width.")
    bit_width: str | None = Field(description="Bit width in words: '4-bit', or a GGUF type's bits per weight.")
    quant_type: str | None = Field(None, description="The format's own type name, e.g. GGUF's q4_k_m.")
    load: list[LoadSnippet] = Field(description="How to load and serve it, in the order the card shows them.")


def transformers_snippet(repo_id: str, revision: str | None, needs: str | None = None) -> LoadSnippet:
    """Loading with transformers' Auto classes; ``needs``: the packages to pip install first."""
    rev = f', revision="{revision}"' if revision else ""
    code = "\n".join(
        [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev}, device_map="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})',
        ]
    )
    intro = f"With transformers (needs `pip install {needs}`):" if needs else "With transformers:"
    return LoadSnippet(intro=intro, language="python", code=code)


def vllm_snippet(repo_id: str, revision: str | None, note: str | None = None, args: str = "") -> LoadSnippet:
    """Serving with ``vllm serve``; ``note``: why vLLM needs no more than ``args`` to recognise the format."""
    rev = f" --revision {revision}" if revision else ""
    return LoadSnippet(
        intro=f"With vLLM ({note}):" if note else "With vLLM:",
        language="bash",
        code=f"vllm serve {repo_id}{rev}{f' {args}' if args else ''}",
    )


def bits_of(fmt: str, options: dict[str, Any]) -> int | None:
    """Bits per weight from the options' ``bits``, else from a format name such as ``bnb-4bit``."""
    if isinstance(options.get("bits"), int) and not isinstance(options.get("bits"), bool):
        return int(options["bits"])
    m = re.search(r"(?<![0-9])(\d+)-?bit", fmt)
    return int(m.group(1)) if m else None


def generic_format_card(fmt: str, options: dict[str, Any], repo_id: str, revision: str | None = None) -> FormatCard:
    """The card facts of a format no installed backend describes: a transformers folder named by its format."""
    bits = bits_of(fmt, options)
    return FormatCard(
        format=fmt,
        library_name="transformers",
        tags=[fmt],
        bits=bits,
        bit_width=f"{bits}-bit" if bits else None,
        load=[transformers_snippet(repo_id, revision)],
    )
