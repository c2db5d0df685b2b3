"""Artifacts: a folder of model files plus ``llmopt.json``, the manifest.

The manifest is written last and atomically (temp file + rename), so a folder without it is an
unfinished artifact. Its ``files`` map is what evaluation and publishing trust: ``verify()``
recomputes every hash and names the files that changed.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmopt.atomic import write_json_atomic
from llmopt.errors import ArtifactError, InputError, NewerArtifactError
from llmopt.results import EVAL_SCHEMAS_READ, EvalReport, GateResult, newer_eval_schema

MANIFEST_NAME = "llmopt.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    """Stable hash of a JSON-able value (sorted keys, no whitespace)."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str
    size: int


class SourceInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="What the user gave: a local path, a .gguf file or a Hub id.")
    resolved_path: str
    revision: str | None = None
    weights_sha256: dict[str, str] = Field(default_factory=dict)
    architecture: str | None = None
    model_type: str | None = None


class CalibrationInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: str
    samples: int
    seq_len: int
    tokens_sha256: str
    text_sha256: str | None = None


class EnvironmentInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    python: str
    platform: str
    packages: dict[str, str] = Field(default_factory=dict)
    device: str
    # Where the backend put the model while quantizing (llmopt/placement.py): GPUs, layers on each.
    placement: dict[str, Any] | None = None


class Manifest(BaseModel):
    """Schema of ``llmopt.json`` (version 1).

    ``evaluation`` and ``gate`` are the typed results (llmopt/results.py); the JSON is the dicts earlier
    versions wrote, so their manifests load as they are (and a dict assigned to either is validated into one).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    schema_version: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    llmopt_version: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    backend: str
    format: str
    runner: str
    options: dict[str, Any]
    source: SourceInfo
    calibration: CalibrationInfo | None = None
    environment: EnvironmentInfo
    quantize_seconds: float | None = None
    files: dict[str, FileEntry]
    recipe: dict[str, Any] | None = None
    evaluation: EvalReport | None = Field(None, description="The last evaluation (without its gate).")
    gate: GateResult | None = Field(None, description="The gate applied to that evaluation, with its thresholds.")

    @field_validator("files")
    @classmethod
    def _files_inside(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        """Every listed file is a file of this folder, named as ``hash_tree`` names it: a table edited to list
        ``../model/model.safetensors`` or an absolute path had files outside the artifact hashed in as its own, and
        such an artifact passed ``verify`` (a run reused it, "up to date") without the weights it loads."""
        for rel in files:
            parts = rel.split("/")
            if (
                not rel
                or rel.startswith("/")
                or "\\" in rel
                or any(part in ("", ".", "..") for part in parts)
                or rel == MANIFEST_NAME
            ):
                raise ValueError(
                    f"'{rel}' is not a file of the artifact folder (the file table lists files inside it, by their "
                    "relative path)"
                )
        return files


def _refuse_newer_schema(mpath: Path, text: str) -> None:
    """A manifest written by a newer llmopt: its fields may mean something this version does not know, so it is
    refused by name (upgrade), not read as schema 1 nor reported as damaged (re-create). So is a manifest whose
    stored evaluation is of a newer ``llmopt.eval/N``: neither dropped as damaged (``eval``) nor re-scored."""
    try:
        data = json.loads(text)
        version = int(data.get("schema_version", SCHEMA_VERSION))
    except (ValueError, TypeError, AttributeError, OverflowError):
        return  # not JSON, not an object, not a number: the model's validation says what is wrong
    if version > SCHEMA_VERSION:
        raise NewerArtifactError(
            f"{mpath} has manifest schema {version}; this llmopt reads schema {SCHEMA_VERSION} and older.",
            "Upgrade llmopt (pip install -U llmopt) to read this artifact.",
        )
    evaluation = data.get("evaluation")
    schema = evaluation.get("schema") if isinstance(evaluation, dict) else None
    if newer_eval_schema(schema):
        raise NewerArtifactError(
            f"{mpath} holds an evaluation of schema {schema}; this llmopt reads {' and '.join(EVAL_SCHEMAS_READ)}.",
            "Upgrade llmopt (pip install -U llmopt) to read this artifact.",
        )


def hash_tree(root: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file below ``root`` except the manifest, keyed by posix relative path."""
    files: dict[str, FileEntry] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return files


def files_digest(files: dict[str, FileEntry]) -> str:
    """One hash over the file table: what an evaluation saw, in a single comparable string."""
    return sha256_json({k: v.sha256 for k, v in sorted(files.items())})


class Artifact:
    """A finished artifact folder and its manifest."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self.dropped_results: str | None = None

    @classmethod
    def open(cls, path: str | Path, *, results_replaceable: bool = False) -> Artifact:
        """The artifact at ``path``. ``results_replaceable`` (eval, which writes a new evaluation): a damaged
        ``evaluation``/``gate`` block is dropped instead of refusing the artifact; the files are still checked
        against their hashes, and ``dropped_results`` says what was dropped."""
        root = Path(path)
        if not root.is_dir():  # a wrong path is bad input (exit 2), not an unfinished artifact
            raise InputError(
                f"{root} is not an artifact folder (it does not exist or is a file).",
                "Give the folder that `llmopt quantize ... -o FOLDER` wrote.",
            )
        mpath = root / MANIFEST_NAME
        if not mpath.is_file() and (root / "report.json").is_file() and (root / "artifacts").is_dir():
            names = sorted(p.name for p in (root / "artifacts").iterdir() if (p / MANIFEST_NAME).is_file())
            raise InputError(
                f"{root} is the folder of a whole `llmopt run`, not one artifact.",
                f"Give one of its artifacts: {root}/artifacts/NAME"
                + (f" ({', '.join(names)})" if names else "")
                + "; or publish the run's passing variants with `llmopt run RECIPE --publish`.",
            )
        if not mpath.is_file():
            raise ArtifactError(
                f"{root} has no {MANIFEST_NAME}: it is not an llmopt artifact, or its quantization did not finish.",
                "Check the path: llmopt writes llmopt.json into every artifact folder it finishes (an interrupted "
                "quantize leaves none in place). To make an artifact, quantize into a new folder.",
            )
        text = mpath.read_text()
        _refuse_newer_schema(mpath, text)
        dropped = None
        try:
            manifest = Manifest.model_validate_json(text)
        except ValueError as exc:
            salvaged = _without_results(text, exc) if results_replaceable else None
            if salvaged is not None:
                manifest, dropped = salvaged[0], _what_is_wrong(exc)
            elif _only_results_damaged(exc) and _one_window_evaluation(text):
                raise ArtifactError(
                    f"{mpath}: its evaluation scored a single window of text, which gives no error bar (its stderr "
                    "is empty), so the evaluation cannot be checked or published.",
                    "Evaluate it again (`llmopt eval`) on longer text, or with a smaller --context or --stride, so "
                    "that the text makes two or more windows.",
                ) from None
            else:
                raise ArtifactError(
                    f"{mpath} is not a valid manifest: {_what_is_wrong(exc)}",
                    "Re-create the artifact with `llmopt quantize`"
                    + (
                        "."
                        if results_replaceable or not _only_results_damaged(exc)
                        else " (or, if only its evaluation is damaged, evaluate it again: `llmopt eval`)."
                    ),
                ) from None
        art = cls(root, manifest)
        art.dropped_results = dropped
        return art

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    def save(self) -> None:
        write_json_atomic(self.manifest_path, self.manifest.model_dump(mode="json"))

    def size_bytes(self) -> int:
        return sum(entry.size for entry in self.manifest.files.values())

    def verify(self) -> list[str]:
        """Relative paths whose content no longer matches the manifest (missing, changed or added)."""
        problems: list[str] = []
        actual = {
            p.relative_to(self.path).as_posix()
            for p in self.path.rglob("*")
            if p.is_file() and p.name != MANIFEST_NAME
        }
        for rel, entry in self.manifest.files.items():
            f = self.path / rel
            if not f.is_file():
                problems.append(f"{rel} (missing)")
            elif f.stat().st_size != entry.size or sha256_file(f) != entry.sha256:
                problems.append(f"{rel} (changed)")
        problems.extend(f"{rel} (not in manifest)" for rel in sorted(actual - set(self.manifest.files)))
        return problems

    def require_intact(self) -> None:
        problems = self.verify()
        if problems:
            raise ArtifactError(
                f"{self.path}: files do not match the manifest: {', '.join(problems[:5])}"
                + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""),
                "Re-create the artifact with `llmopt quantize --overwrite`, then evaluate it again.",
            )


def _only_results_damaged(exc: ValueError) -> bool:
    errors = exc.errors() if isinstance(exc, ValidationError) else []
    return bool(errors) and all(e["loc"] and e["loc"][0] in ("evaluation", "gate") for e in errors)


def _one_window_evaluation(text: str) -> bool:
    """Whether the stored evaluation scored one window (made by a version that did not refuse it): its stderrs were
    NaN, which JSON stores as null."""
    try:
        evaluation = json.loads(text).get("evaluation")
        return isinstance(evaluation, dict) and (evaluation.get("settings") or {}).get("windows") == 1
    except (ValueError, AttributeError):
        return False


def manifest_without_damaged_results(text: str) -> Manifest | None:
    """The manifest in ``text``, read as ``Artifact.open(..., results_replaceable=True)`` reads it: a damaged stored
    evaluation or gate is dropped (the files table and the rest still have to be valid); None when it does not
    parse even so."""
    try:
        return Manifest.model_validate_json(text)
    except ValueError as exc:
        salvaged = _without_results(text, exc)
        return salvaged[0] if salvaged is not None else None


def _without_results(text: str, exc: ValueError) -> tuple[Manifest] | None:
    """The manifest without its ``evaluation`` and ``gate`` when only those fail validation (a hand edit of the
    stored results); None when anything else is wrong too."""
    if not _only_results_damaged(exc):
        return None
    try:
        data = json.loads(text)
        data["evaluation"] = data["gate"] = None
        return (Manifest.model_validate(data),)
    except (ValueError, TypeError):
        return None


def _what_is_wrong(exc: ValueError) -> str:
    """The first problem, with where it is (``evaluation.artifact.perplexity: ...``) when pydantic knows."""
    if isinstance(exc, ValidationError) and exc.errors():
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
