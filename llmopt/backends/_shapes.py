"""Input widths of a decoder's linear layers, read from config.json alone (no weights needed).

Used to reject group sizes that do not divide a layer before minutes of calibration are spent.
"""

from __future__ import annotations

import math
from typing import Any

from llmopt.errors import OptionsError


def linear_input_dims(config: dict[str, Any]) -> dict[str, int]:
    """Map of linear layer kind -> input features, for Llama-like decoders; empty if unknown."""
    cfg = config.get("text_config") or config
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    if not hidden:
        return {}
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    head_dim = cfg.get("head_dim") or (hidden // heads if heads else None)
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or (4 * hidden if "n_embd" in cfg else None)
    dims = {"q_proj/k_proj/v_proj": int(hidden), "gate_proj/up_proj": int(hidden)}
    if heads and head_dim:
        dims["o_proj"] = int(heads * head_dim)
    if inter:
        dims["down_proj"] = int(inter)
    return dims


def dividing_group_sizes(config: dict[str, Any], candidates: tuple[int, ...] = (32, 64, 128, 256)) -> list[int]:
    """The ``candidates`` that divide the input width of every linear layer (all of them when widths are unknown)."""
    common = 0
    for width in linear_input_dims(config).values():
        common = math.gcd(common, width)
    return [g for g in candidates if common % g == 0]


def group_size_hint(config: dict[str, Any], candidates: tuple[int, ...] = (32, 64, 128, 256)) -> str:
    """What to pass instead of a bad group size: only sizes that fit this model."""
    good = dividing_group_sizes(config, candidates)
    if not good:
        return "Use --group-size -1 (one group per row)."
    return f"Use --group-size {' or '.join(str(g) for g in good)}, or -1 (one group per row)."


def group_size_problem(config: dict[str, Any], group_size: int) -> str | None:
    """A message naming the first layer whose input the group size does not divide, or None."""
    if group_size == -1:
        return None
    dims = linear_input_dims(config)
    for layer, width in dims.items():
        if width % group_size:
            good = dividing_group_sizes(config)
            options = ", ".join(str(g) for g in good) if good else "none of 32/64/128/256"
            return (
                f"group size {group_size} does not divide the input width {width} of {layer} "
                f"(widths here: {', '.join(f'{k}={v}' for k, v in dims.items())}); "
                f"group sizes that divide every layer: {options}, or -1 (one group per row)"
            )
    return None


def check_group_size(config: dict[str, Any], group_size: int) -> None:
    """Refuse (OptionsError, exit 2) a group size that is not a size, or that does not divide every layer."""
    if group_size != -1 and group_size < 1:
        raise OptionsError(
            f"group size {group_size} is not valid: a group has at least one weight, or -1 for whole rows.",
            group_size_hint(config),
        )
    problem = group_size_problem(config, group_size)
    if problem:
        raise OptionsError(
            problem, "Pass --group-size (recipe: the variant's options.group_size) with one of the sizes named above."
        )
