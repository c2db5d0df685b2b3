"""Backend protocol and registry.

A backend is a class named by a ``"module:attr"`` string. Built-in ones are listed in ``BUILTIN``;
third-party packages add theirs through the entry-point group ``llmopt.backends``. Nothing is
imported until a backend is asked for, and a backend that fails to import is reported as
unavailable with its reason instead of breaking the CLI. Backend modules import only pydantic at
module level; their libraries (torch, gptqmodel, bitsandbytes, ...) are imported inside methods.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import NoneType, UnionType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmopt.errors import BackendUnavailableError, InputError, OptionsError
from llmopt.plugins import load_target, registered

if TYPE_CHECKING:
    from llmopt.data import CalibrationSet
    from llmopt.placement import DeviceTarget
    from llmopt.progress import Reporter
    from llmopt.source import SourceModel

ENTRY_POINT_GROUP = "llmopt.backends"

BUILTIN: dict[str, str] = {
    "gptq": "llmopt.backends.gptq:GPTQBackend",
    "bnb-int8": "llmopt.backends.bnb:BnbInt8Backend",
    "bnb-nf4": "llmopt.backends.bnb:BnbNf4Backend",
    "bnb-fp4": "llmopt.backends.bnb:BnbFp4Backend",
    "awq": "llmopt.backends.awq:AWQBackend",
    "gguf": "llmopt.backends.gguf:GGUFBackend",
}


@dataclass(frozen=True)
class Requirement:
    """A Python package a backend needs, and how to get it."""

    module: str  # import name
    package: str  # pip name
    extra: str | None = None  # llmopt extra that brings it

    def install_hint(self) -> str:
        if self.extra:
            return f"pip install 'llmopt[{self.extra}]'  (or: pip install {self.package})"
        return f"pip install {self.package}"

    def present(self) -> bool:
        return importlib.util.find_spec(self.module) is not None


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


class OptionInfo(BaseModel):
    """One option of a backend, as `llmopt backends --options METHOD` lists it."""

    name: str
    type: str = Field(description="What a value is: int, float, bool, str, list[str], or the choices a|b|c.")
    default: Any = Field(description="The value when not given (JSON); None when required or none.")
    required: bool
    help: str


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
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
        items = [t.strip() for t in text.strip().removeprefix("[").removesuffix("]").split(",")]
        return [_read_typed(inner, t) for t in items if t]
    if annotation in (str, int, float, bool):
        return text  # pydantic reads numbers and booleans (true/false, yes/no, on/off, 1/0) from text itself
    import yaml

    return yaml.safe_load(text)  # nested structures


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


@dataclass
class QuantizeInputs:
    """Everything a backend gets to produce its files."""

    source: SourceModel
    options: BaseModel
    calibration: CalibrationSet | None
    out_dir: Path
    reporter: Reporter
    device: str  # the first device ("cpu" or "cuda:N")
    # Every device the job may use (llmopt/placement.py); None: only ``device``. Backends that can spread a
    # model over several GPUs read it; the others work on ``device`` as before.
    target: DeviceTarget | None = None


class Backend(ABC):
    """What every quantization method provides."""

    name: ClassVar[str]
    format: ClassVar[str]  # what it writes: gptq, awq, bnb-4bit, bnb-8bit, gguf, ...
    runner: ClassVar[str] = "hf"  # which runner loads its output
    needs_calibration: ClassVar[bool] = False
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]]
    requirements: ClassVar[tuple[Requirement, ...]] = ()

    def check(self) -> list[str]:
        """What is missing to run here, each with the exact install command; empty when usable."""
        return [
            f"missing Python package '{r.package}': {r.install_hint()}" for r in self.requirements if not r.present()
        ]

    def parse_options(self, raw: dict[str, Any]) -> BaseModel:
        """Validate user options; unknown keys are errors naming the valid ones."""
        try:
            return self.Options.model_validate(raw)
        except ValidationError as exc:
            valid = ", ".join(sorted(self.Options.model_fields))
            problems = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"]) or "options"
                if err["type"] == "extra_forbidden":
                    close = difflib.get_close_matches(loc, list(self.Options.model_fields), n=1)
                    extra = f" (did you mean '{close[0]}'?)" if close else ""
                    problems.append(f"'{loc}' is not an option of {self.name}{extra}")
                else:
                    problems.append(f"{loc}: {err['msg']}")
            raise OptionsError(
                f"invalid options for {self.name}: " + "; ".join(problems),
                f"valid options of {self.name}: {valid}",
            ) from None

    def option_schema(self) -> list[OptionInfo]:
        """Every option of this backend: name, type, default and help, from its ``Options`` model."""
        out = []
        for name, f in self.Options.model_fields.items():
            required = f.is_required()
            default = None if required else f.get_default(call_default_factory=True)
            out.append(
                OptionInfo(
                    name=name,
                    type=_type_text(f.annotation),
                    default=default,
                    required=required,
                    help=f.description or "",
                )
            )
        return out

    def wants_calibration(self, options: BaseModel) -> bool:
        """Whether quantizing with these options needs calibration samples (gguf: only for an imatrix)."""
        return self.needs_calibration

    def validate(self, options: BaseModel, source: SourceModel, device: str) -> None:  # noqa: B027
        """Cheap checks against the model's config and the device, run before any heavy work."""

    @abstractmethod
    def quantize(self, inputs: QuantizeInputs) -> dict[str, Any]:
        """Write the model files (weights, config, tokenizer) into ``inputs.out_dir``.

        Returns extra facts for the manifest's options record (e.g. the kernel used); may be empty. A
        ``placement`` entry (where the model was put, ``Placement.record()``) goes to the manifest's
        ``environment.placement`` instead. The caller hashes the files and writes ``llmopt.json`` afterwards.
        """

    def format_card(self, options: dict[str, Any], repo_id: str, revision: str | None = None) -> FormatCard:
        """What the model card says about this backend's format: tags, bit width, how to load and serve it.

        ``options``: as the manifest records them; ``repo_id``/``revision``: where the artifact is published.
        The default describes a transformers folder; backends whose output loads otherwise override it.
        """
        return generic_format_card(self.format, options, repo_id, revision)

    def library_versions(self) -> dict[str, str]:
        versions = {}
        for r in self.requirements:
            try:
                versions[r.package] = importlib.metadata.version(r.package)
            except importlib.metadata.PackageNotFoundError:
                continue
        return versions


@dataclass
class BackendInfo:
    name: str
    target: str
    origin: str  # "builtin" or the distribution that registered it
    backend: Backend | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.backend is not None and not self.problems


def _registry() -> dict[str, tuple[str, str]]:
    return registered(ENTRY_POINT_GROUP, BUILTIN)


def _load(target: str) -> type[Backend]:
    cls: type[Backend] = load_target(target, Backend)
    return cls


def _info(name: str, target: str, origin: str) -> BackendInfo:
    info = BackendInfo(name=name, target=target, origin=origin)
    try:
        info.backend = _load(target)()
    except Exception as exc:  # report, never crash: the other backends must stay usable
        info.problems = [f"failed to load {target}: {type(exc).__name__}: {exc}"]
        return info
    info.problems = info.backend.check()
    return info


def available_backends() -> list[BackendInfo]:
    """Every registered backend with whether it is usable here."""
    return [_info(name, target, origin) for name, (target, origin) in sorted(_registry().items())]


def _unknown(name: str, reg: dict[str, tuple[str, str]]) -> InputError:
    close = difflib.get_close_matches(name, list(reg), n=2)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    listed = f"{hint}available: {', '.join(sorted(reg))} (see `llmopt backends`)."
    return InputError(f"unknown method '{name}'.", listed)


def get_backend(name: str, *, require_usable: bool = True) -> Backend:
    reg = _registry()
    if name not in reg:
        raise _unknown(name, reg)
    target, origin = reg[name]
    info = _info(name, target, origin)
    if info.backend is None or (require_usable and info.problems):
        raise BackendUnavailableError(
            f"backend '{name}' is not usable here: " + "; ".join(info.problems),
            "Install what is named above, then check with `llmopt backends`.",
        )
    return info.backend


def describe_backend(name: str) -> Backend:
    """The backend registered as ``name``, for what it says about itself (options, format card), without
    checking that it can run here (``check`` may probe a toolchain). Unknown: exit 2; fails to import: exit 4."""
    reg = _registry()
    if name not in reg:
        raise _unknown(name, reg)
    target, _ = reg[name]
    try:
        return _load(target)()
    except Exception as exc:  # a plugin's own bug: reported, never a traceback
        raise BackendUnavailableError(
            f"backend '{name}' failed to load ({target}): {type(exc).__name__}: {exc}",
            "Reinstall or fix the package that provides it; `llmopt backends` lists every backend.",
        ) from None


def format_card(
    backend: str, fmt: str, options: dict[str, Any], repo_id: str, revision: str | None = None
) -> FormatCard:
    """The card facts of an artifact made by ``backend`` in format ``fmt``, from that backend when it is installed
    and still writes that format; otherwise those of a transformers folder (an artifact outlives its plugin)."""
    try:
        found = describe_backend(backend)
    except (InputError, BackendUnavailableError):
        found = None
    if found is None or found.format != fmt:
        return generic_format_card(fmt, options, repo_id, revision)
    return found.format_card(options, repo_id, revision)


def save_tokenizer(inputs: QuantizeInputs) -> None:
    """The source's tokenizer files into the artifact (evaluation checks it tokenizes like its baseline)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inputs.source.path, trust_remote_code=inputs.source.trust_remote_code)
    tok.save_pretrained(inputs.out_dir)
