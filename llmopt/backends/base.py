"""Backend protocol and registry.

A backend is a class named by a ``"module:attr"`` string. Built-in ones are listed in ``BUILTIN``;
third-party packages add theirs through the entry-point group ``llmopt.backends``. Nothing is
imported until a backend is asked for, and a backend that fails to import is reported as
unavailable with its reason instead of breaking the CLI. Backend modules import only pydantic at
module level; their libraries (torch, gptqmodel, bitsandbytes, ...) are imported inside methods.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ValidationError

from llmopt.errors import BackendUnavailableError, InputError, OptionsError

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
    found = {name: (target, "builtin") for name, target in BUILTIN.items()}
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken distribution must not break the CLI
        eps = ()  # type: ignore[assignment]
    for ep in eps:
        if ep.name not in found:
            dist = getattr(getattr(ep, "dist", None), "name", None) or "entry point"
            found[ep.name] = (ep.value, dist)
    return found


def _load(target: str) -> type[Backend]:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"{target} is not a llmopt Backend subclass")
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


def get_backend(name: str, *, require_usable: bool = True) -> Backend:
    reg = _registry()
    if name not in reg:
        close = difflib.get_close_matches(name, list(reg), n=2)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise InputError(
            f"unknown method '{name}'.",
            f"{hint}available: {', '.join(sorted(reg))} (see `llmopt backends`).",
        )
    target, origin = reg[name]
    info = _info(name, target, origin)
    if info.backend is None or (require_usable and info.problems):
        raise BackendUnavailableError(
            f"backend '{name}' is not usable here: " + "; ".join(info.problems),
            "Install what is named above, then check with `llmopt backends`.",
        )
    return info.backend


def save_tokenizer(inputs: QuantizeInputs) -> None:
    """The source's tokenizer files into the artifact (evaluation checks it tokenizes like its baseline)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(inputs.source.path, trust_remote_code=inputs.source.trust_remote_code)
    tok.save_pretrained(inputs.out_dir)
