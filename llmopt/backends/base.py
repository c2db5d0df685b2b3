"""Backend protocol and registry.

A backend is a class named by a ``"module:attr"`` string. Built-in ones are listed in ``BUILTIN``;
third-party packages add theirs through the entry-point group ``llmopt.backends``. Nothing is
imported until a backend is asked for, and a backend that fails to import is reported as
unavailable with its reason instead of breaking the CLI. Backend modules import only pydantic at
module level; their libraries (torch, gptqmodel, bitsandbytes, ...) are imported inside methods.

A backend owns its format: its options (``Options``; options.py reads ``-O key=value`` by their types), the runner
that loads its output (``runner``, a name in runners/base.py's registry), and what the model card says about the
format (``format_card``, format_card.py).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ValidationError

from llmopt.backends.format_card import FormatCard, generic_format_card
from llmopt.backends.options import OptionInfo, option_schema
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
    "hqq": "llmopt.backends.hqq:HQQBackend",
    "gguf": "llmopt.backends.gguf:GGUFBackend",
    "llmc-fp8-dynamic": "llmopt.backends.llmc:LlmcFP8DynamicBackend",
    "llmc-w8a8-int8": "llmopt.backends.llmc:LlmcW8A8Int8Backend",
    "llmc-w4a16": "llmopt.backends.llmc:LlmcW4A16Backend",
    "llmc-nvfp4": "llmopt.backends.llmc:LlmcNVFP4Backend",
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
    # options that change how fast an artifact is made, never what is made: `llmopt run` reuses an artifact made
    # with other values of these
    speed_only_options: ClassVar[frozenset[str]] = frozenset()
    note: str | None = None  # what check() learned that the listing shows (gguf: whether llama.cpp decodes here)

    def check(self) -> list[str]:
        """What is missing to run here, each with the exact install command; empty when usable."""
        return [
            f"missing Python package '{r.package}': {r.install_hint()}" for r in self.requirements if not r.present()
        ]

    def parse_options(self, raw: dict[str, Any]) -> BaseModel:
        """Validate user options; unknown keys are errors naming the valid ones."""
        try:
            options = self.Options.model_validate(raw)
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
        # JSON has no inf/nan: the manifest would record null (or refuse to load) for what the artifact was made with
        odd = [k for k, v in options.model_dump().items() if isinstance(v, float) and not math.isfinite(v)]
        if odd:
            raise OptionsError(
                f"invalid options for {self.name}: "
                + "; ".join(f"{k}: {getattr(options, k)} is not a finite number" for k in odd),
                "Give a finite number (the largest a float holds is about 1.8e308).",
            )
        return options

    def option_schema(self) -> list[OptionInfo]:
        """Every option of this backend: name, type, default and help, from its ``Options`` model."""
        return option_schema(self.Options)

    def wants_calibration(self, options: BaseModel) -> bool:
        """Whether quantizing with these options needs calibration samples (gguf: only for an imatrix)."""
        return self.needs_calibration

    def unused_calibration(self, options: BaseModel) -> tuple[str, str]:
        """Message and hint refusing calibration text that these options would not read."""
        return (
            f"{self.name} is calibration-free: it reads no calibration text, so --calibration would be ignored.",
            "Drop --calibration (and --samples / --seq-len).",
        )

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
    from llmopt.source import load_tokenizer

    tok = load_tokenizer(inputs.source.path, trust_remote_code=inputs.source.trust_remote_code)
    tok.save_pretrained(inputs.out_dir)
