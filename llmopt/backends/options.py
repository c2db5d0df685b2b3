"""A backend's options as the CLI meets them: ``-O key=value`` read by each option's type, flags and pairs merged,
and the schema ``llmopt backends --options METHOD`` lists. The options model itself (pydantic, ``Backend.Options``)
stays the one place that says what is valid.
"""

from __future__ import annotations

from types import NoneType, UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, Field, ValidationError

from llmopt.errors import InputError

if TYPE_CHECKING:
    from llmopt.backends.base import Backend


class OptionInfo(BaseModel):
    """One option of a backend, as `llmopt backends --options METHOD` lists it."""

    name: str
    type: str = Field(description="What a value is: int, float, bool, str, list[str], or the choices a|b|c.")
    default: Any = Field(description="The value when not given (JSON); None when required or none.")
    required: bool
    help: str


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:  # a type with its validator (units.WholeNumber) inside a union: the type is what counts
        return _type_text(args[0])
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, UnionType):
        return " | ".join("none" if a is NoneType else _type_text(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list[{_type_text(args[0]) if args else 'str'}]"
    return getattr(annotation, "__name__", str(annotation))


def read_option(options: type[BaseModel] | None, key: str, text: str) -> Any:
    """The value ``-O key=text`` means, read by the type of option ``key``: numbers in base 10 (YAML took ``064``
    for octal 52), lists comma-separated, ``none`` for an option that may be unset; text where the type is text.
    A key that is not an option (or no options model) is read as a YAML scalar; validation then names it."""
    import yaml

    field = options.model_fields.get(key) if options is not None else None
    if field is None:
        return yaml.safe_load(text)
    return _read_typed(field.annotation, text)


def _read_typed(annotation: Any, text: str) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _read_typed(args[0], text)
    if origin is Literal:
        # the choice whose spelling this is; otherwise the text, which validation refuses naming the choices
        return next((a for a in args if str(a) == text.strip()), text)
    if origin in (Union, UnionType):
        rest = [a for a in args if a is not NoneType]
        if len(rest) < len(args) and text.strip().lower() in ("none", "null") and str not in rest:
            return None
        return _read_typed(rest[0], text) if len(rest) == 1 else text
    if origin in (list, tuple, set, frozenset):
        inner = args[0] if args else str
        items = [_unquote(t.strip()) for t in text.strip().removeprefix("[").removesuffix("]").split(",")]
        return [_read_typed(inner, t) for t in items if t]
    if origin is dict or annotation in (dict, Any):
        import yaml

        return yaml.safe_load(text)  # a mapping (or anything at all) has no one-line spelling but YAML's
    # pydantic reads numbers, booleans (true/false, yes/no, on/off, 1/0), paths and enums from text itself
    return text


def _unquote(item: str) -> str:
    """``"lm_head"`` as ``lm_head``: a list written the JSON/YAML way (``-O 'skip_modules=["lm_head"]'``) would
    otherwise name a module with quotes in its name, which matches nothing."""
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
        return item[1:-1]
    return item


def _same(options: type[BaseModel] | None, key: str, a: Any, b: Any) -> bool:
    """Whether two values of option ``key`` are one value once validated (``--quant-type Q4_K_M`` vs ``q4_k_m``)."""
    if a == b or options is None or key not in options.model_fields:
        return bool(a == b)
    values = []
    for v in (a, b):
        try:
            values.append(getattr(options.model_validate({key: v}), key))
        except ValidationError:
            return False
    return bool(values[0] == values[1])


def options_from_cli(backend: Backend | None, flags: dict[str, Any], pairs: list[str] | None) -> dict[str, Any]:
    """Typed flags (None: not given) and ``-O key=value`` pairs as one options dict, each value read by the
    backend's options model; the same option set to two different values is refused (exit 2), as
    ``--double-quant -O double_quant=false`` would otherwise resolve silently to whichever came last."""
    model = backend.Options if backend is not None else None
    options: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in flags.items():
        if value is None:
            continue
        name = key.replace("_", "-")
        options[key] = value
        given_as[key] = (f"--{name}" if value else f"--no-{name}") if isinstance(value, bool) else f"--{name} {value}"
    for pair in pairs or []:
        raw_key, sep, text = pair.partition("=")
        key = raw_key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"option '{pair}' is not of the form key=value.", "Write it as -O name=value.")
        value = read_option(model, key, text)
        if key in options and not _same(model, key, options[key], value):
            raise InputError(
                f"{given_as[key]} and -O {pair} set '{key}' to different values.",
                "Give each option once, either as its flag or as -O key=value.",
            )
        options.setdefault(key, value)
        given_as.setdefault(key, f"-O {pair}")
    return options


def option_schema(options: type[BaseModel]) -> list[OptionInfo]:
    """Every option of an options model: name, type, default and help."""
    out = []
    for name, f in options.model_fields.items():
        required = f.is_required()
        out.append(
            OptionInfo(
                name=name,
                type=_type_text(f.annotation),
                default=None if required else f.get_default(call_default_factory=True),
                required=required,
                help=f.description or "",
            )
        )
    return out
