"""Sizes for people: the one byte format of reports and model cards (the CLI's tables keep their own,
``cli/_common.human_bytes``, whose output differs); and ``WholeNumber``, the type of every count in a spec."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError


def fmt_bytes(n: float | None) -> str:
    """``1.23 GB`` / ``45.6 MB`` / ``7.8 KB`` (decimal units); a dash for unknown."""
    if n is None:
        return "–"
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _whole_number(value: Any) -> Any:
    # pydantic's lax int takes true as 1 and 2.0 as 2: in a recipe either is a mistake, not a count
    if isinstance(value, bool | float):
        raise PydanticCustomError("int_type", "Input should be a whole number")
    if isinstance(value, str):
        # ASCII digits only: int() also reads '١٦' (Arabic-Indic) and '１６' (full-width) as 16
        if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            raise PydanticCustomError("int_parsing", "Input should be a whole number")
        return int(value)
    return value


# Every whole-number setting of a recipe (and of the specs the CLI builds) takes this one rule: an integer, or a
# quoted integer such as '16' (what `${VAR}` expansion makes of a number); never true/false, 2.0 or '16.5'.
WholeNumber = Annotated[int, BeforeValidator(_whole_number)]
