"""Publish a run's GGUF variants into one Hub repo, the way GGUF publishers lay one out.

One ``.gguf`` file per quant type at the repo's root, named ``MODEL-Q4_K_M.gguf``; each file's llmopt manifest
(local paths cut, as ``hub.public_manifest`` does) as ``llmopt/MODEL-Q4_K_M.json``; one ``README.md`` card whose
table lists every ``.gguf`` file the repo holds after the commit, with its size and quality (perplexity Δ vs
FP16 ± stderr, mean KL divergence, gate) and how to run it with llama.cpp. Everything goes up in one commit.

- Each artifact passes the same checks as ``hub.publish`` (``check_publishable``). One whose gate failed, or that
  was never gated, is left out and listed as such in the card; none passing: nothing is uploaded (exit 3).
  An artifact whose files or stored evaluation were edited stops the whole publish (exit 5): nothing is sent.
- Artifacts that are not GGUF in a run folder are skipped with a note (publish them with ``llmopt publish
  ARTIFACT REPO``); a recipe with ``publish.mode: gguf-one-repo`` refuses them when it is loaded.
- Publishing again adds or replaces files and never deletes: the repo is read first (its files, their sizes and
  LFS hashes, and the ``llmopt/*.json`` records of the ``.gguf`` files this commit does not replace), and the
  card describes the union. A record's numbers are shown only when the file's hash in the repo is the one the
  record lists, and the numbers follow from the record's per-window scores (``evaluation_problems``).
- The commit names the revision it read (``parent_commit``): when someone else committed in between, the Hub
  refuses it, and the repo is read again and the card rebuilt (up to three times), so two publishes of one model
  at the same time cannot drop each other's rows.
- ``dry_run`` sends nothing: it lists this commit's files and renders the card from them alone (a note says the
  repo's other files were not read).
- No Hub benchmark results (``.eval_results/``, ``hub.publish``'s ``benchmarks``): the Hub keeps one score per
  benchmark task per repo, and this repo holds several models (``BENCHMARKS_REFUSED``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmopt import __version__
from llmopt.artifact import MANIFEST_NAME, Artifact, FileEntry, Manifest
from llmopt.errors import ArtifactError, GateFailedError, InputError
from llmopt.evaluate.gate import evaluation_problems
from llmopt.outputs import ARTIFACTS_DIR
from llmopt.progress import Reporter, SilentReporter
from llmopt.results import GateCheck, GGUFFileRow, GGUFRepoPublish, LeftOutVariant, UploadedFile
from llmopt.source import HUB_ID
from llmopt.units import fmt_bytes

GGUF_FORMAT = "gguf"
RECORD_DIR = "llmopt"
ATTEMPTS = 3  # reads and commits when another commit lands in between
BENCHMARKS_REFUSED = (
    "benchmark results (.eval_results/) are not published with the GGUF one-repo layout: the Hub keeps one score "
    "per benchmark task per repo, and this repo holds one file per quant type, each with its own score"
)


@dataclass
class _Candidate:
    """A gated GGUF artifact and where its model file goes in the repo."""

    art: Artifact
    variant: str
    quant_type: str  # Q4_K_M
    bit_width: str | None
    gguf_file: str  # in the artifact folder
    files: dict[str, FileEntry]
    repo_path: str = ""  # set once the model name is known

    @property
    def record(self) -> str:
        return record_path(self.repo_path)

    @property
    def size(self) -> int:
        return self.files[self.gguf_file].size


@dataclass
class _Selection:
    candidates: list[_Candidate] = field(default_factory=list)
    left_out: list[LeftOutVariant] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass
class _RepoFile:
    size: int
    sha256: str | None  # LFS sha256; None for a file kept in git (never a .gguf of any size)


@dataclass
class _RepoState:
    head: str | None
    files: dict[str, _RepoFile]
    records: dict[str, bytes]  # record path -> its content, for the .gguf files this commit keeps


def record_path(repo_path: str) -> str:
    """Where a ``.gguf`` file's llmopt manifest lives in the repo."""
    return f"{RECORD_DIR}/{Path(repo_path).stem}.json"


# --- which artifacts -------------------------------------------------------------------------------


def _folders(path: Path, only: list[str] | None) -> tuple[list[Path], bool]:
    """The artifact folders to consider and whether ``path`` is a run folder (else: one artifact)."""
    if (path / MANIFEST_NAME).is_file():
        if only:
            raise InputError(
                f"--only picks variants of a run folder, and {path} is one artifact.",
                "Leave out --only, or give the run folder (the --output of `llmopt run`).",
            )
        return [path], False
    arts = path / ARTIFACTS_DIR
    if not arts.is_dir():
        raise ArtifactError(
            f"{path} is neither an artifact folder (no {MANIFEST_NAME}) nor a run folder (no {ARTIFACTS_DIR}/).",
            "Give the folder `llmopt run` wrote (its --output), or one GGUF artifact folder.",
        )
    found = {p.name: p for p in sorted(arts.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if only:
        missing = [name for name in only if name not in found]
        if missing:
            raise InputError(
                f"the run folder {path} has no artifact '{missing[0]}'.",
                f"artifacts there: {', '.join(found) or 'none'}",
            )
        return [found[name] for name in dict.fromkeys(only)], True
    if not found:
        raise ArtifactError(
            f"{arts} holds no artifacts.", "Run the recipe first (`llmopt run RECIPE`), then publish its folder."
        )
    return list(found.values()), True


def _why_not_published(m: Manifest) -> str:
    """Why an artifact that ``check_publishable`` refused for its gate stays out (no local paths: it goes on
    the card)."""
    if m.evaluation is None or m.gate is None:
        return "not evaluated"
    if not m.gate.checks:
        return "evaluated without a gate threshold"
    return "gate failed: " + "; ".join(c.message for c in m.gate.failures())


def select(path: str | Path, only: list[str] | None = None) -> _Selection:
    """The GGUF artifacts of a run folder (or one artifact folder) that may be published, those left out
    (gate), and those skipped (not GGUF, unfinished). Raises on a tampered artifact (exit 5)."""
    from llmopt.backends.base import format_card
    from llmopt.hub import check_publishable

    root = Path(path).expanduser()
    folders, is_run = _folders(root, only)
    sel = _Selection()
    for folder in folders:
        if is_run and not (folder / MANIFEST_NAME).is_file():
            sel.skipped.append(f"{folder.name}: unfinished artifact (no {MANIFEST_NAME})")
            continue
        art = Artifact.open(folder)
        m = art.manifest
        variant = str((m.recipe or {}).get("variant") or folder.name)
        if m.format != GGUF_FORMAT:
            if not is_run:
                raise InputError(
                    f"{folder} is a {m.format} artifact; the gguf-one-repo layout publishes .gguf files only.",
                    f"Publish it on its own: `llmopt publish {folder} REPO`.",
                )
            sel.skipped.append(f"{variant}: {m.format}, not GGUF (publish it with `llmopt publish ARTIFACT REPO`)")
            continue
        options = {k: v for k, v in m.options.items() if k != "_resolved"}
        facts = format_card(m.backend, m.format, options, "org/name")
        quant = facts.quant_type.upper() if facts.quant_type else None
        try:
            files = check_publishable(art)
        except GateFailedError:
            sel.left_out.append(LeftOutVariant(variant=variant, quant_type=quant, reason=_why_not_published(m)))
            continue
        resolved = m.options.get("_resolved")
        gguf_file = resolved.get("gguf_file") if isinstance(resolved, dict) else None
        if not isinstance(gguf_file, str) or gguf_file not in files or quant is None:
            raise ArtifactError(
                f"{folder}: its {MANIFEST_NAME} names no GGUF model file of a known quant type.",
                "Re-create the artifact with `llmopt quantize --method gguf --overwrite` and evaluate it again.",
            )
        sel.candidates.append(_Candidate(art, variant, quant, facts.bit_width, gguf_file, files))
    sel.candidates.sort(key=lambda c: (-c.size, c.variant))  # the card's order: bigger (better) types first
    return sel


def model_file_name(candidates: list[_Candidate], base_model: str | None) -> str:
    """The model part of the repo's file names: the base model's Hub name, else the artifact's own file name
    without its quant type (``SmolLM2-135M-Instruct``)."""
    from llmopt.model_card import base_model_of

    first = candidates[0]
    base = base_model_of(first.art, base_model)
    if base:
        name = base.rstrip("/").split("/")[-1]
    else:
        name = re.sub(rf"[-.]{re.escape(first.quant_type)}\.gguf$", "", first.gguf_file, flags=re.IGNORECASE)
        name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _assign_paths(candidates: list[_Candidate], name: str) -> None:
    by_path: dict[str, _Candidate] = {}
    for c in candidates:
        c.repo_path = f"{name}-{c.quant_type}.gguf"
        other = by_path.get(c.repo_path)
        if other is not None:
            raise InputError(
                f"variants '{other.variant}' and '{c.variant}' are both {c.quant_type}: one repo holds one file per "
                "quant type.",
                "Publish one of them (--only VARIANT), or the other to another repo.",
            )
        by_path[c.repo_path] = c


# --- the card ----------------------------------------------------------------------------------------


def _weights_digest(m: Manifest) -> str | None:
    hashes = m.source.weights_sha256
    if not hashes:
        return None
    return hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest()[:16]


def _measured_on(m: Manifest) -> str | None:
    ev = m.evaluation
    if ev is None:
        return None
    s = ev.settings
    dataset = Path(s.dataset or "").name or "text"
    bos = ", BOS added" if s.add_bos else ""
    return (
        f"`{dataset}` (sha256 `{(s.text_sha256 or '')[:12]}…`), {s.tokens_scored or 0:,} tokens, "
        f"windows of {s.context_length} (stride {s.stride}{bos}), {s.device or '?'}"
    )


Origin = Literal["this commit", "already in the repo"]

_SHORT = {
    "max_ppl_increase_pct": "Δ ≤ +{:g}%",
    "max_ppl": "perplexity ≤ {:g}",
    "max_kld": "KLD ≤ {:g}",
    "min_top1_pct": "top-1 ≥ {:g}%",
    "min_decode_speedup": "speedup ≥ {:g}x",
}


def _short_check(check: GateCheck) -> str:
    """A gate check as a table cell: its threshold (the full message is in the file's record)."""
    form = _SHORT.get(check.name)
    return form.format(check.threshold) if form else f"{check.name} {check.threshold:g}"


def _row(
    m: Manifest, path: str, size: int, sha256: str | None, origin: Origin, variant: str | None, record: str | None
) -> GGUFFileRow:
    from llmopt.backends.base import format_card

    options = {k: v for k, v in m.options.items() if k != "_resolved"}
    facts = format_card(m.backend, m.format, options, "org/name")
    ev, gate = m.evaluation, m.gate
    dist = ev.artifact.distribution if ev else None
    return GGUFFileRow(
        path=path,
        quant_type=facts.quant_type.upper() if facts.quant_type else None,
        bit_width=facts.bit_width,
        size=size,
        sha256=sha256,
        origin=origin,
        variant=variant,
        record=record,
        perplexity=ev.artifact.perplexity if ev else None,
        perplexity_stderr=ev.artifact.stderr if ev else None,
        baseline_perplexity=ev.baseline.perplexity if ev else None,
        delta_pct=ev.delta_pct if ev else None,
        delta_pct_stderr=ev.delta_pct_stderr if ev else None,
        kld_mean=dist.kld_mean if dist else None,
        kld_stderr=dist.kld_stderr if dist else None,
        gate_passed=gate.passed if gate else None,
        gate_checks=[_short_check(c) for c in gate.checks] if gate else [],
        measured_on=_measured_on(m),
        source_weights=_weights_digest(m),
    )


def _quant_from_name(path: str) -> str | None:
    found = re.search(r"[-.]((?:I?Q\d\w*?)|F16|BF16|F32)\.gguf$", path, flags=re.IGNORECASE)
    return found.group(1).upper() if found else None


def _existing_row(path: str, f: _RepoFile, records: dict[str, bytes]) -> GGUFFileRow:
    """A ``.gguf`` file already in the repo that this commit keeps: its numbers from its llmopt record, when the
    record describes exactly that file."""
    record = record_path(path)
    bare = GGUFFileRow(
        path=path, quant_type=_quant_from_name(path), size=f.size, sha256=f.sha256, origin="already in the repo"
    )
    if record not in records:
        bare.note = "no llmopt record in the repo: not measured by llmopt"
        return bare
    try:
        m = Manifest.model_validate_json(records[record])
    except ValueError:
        bare.note = f"its record `{record}` is not an llmopt manifest this version reads"
        return bare
    resolved = m.options.get("_resolved")
    name = resolved.get("gguf_file") if isinstance(resolved, dict) else None
    entry = m.files.get(name) if isinstance(name, str) else None
    bare.record = record
    if entry is None or f.sha256 is None or entry.sha256 != f.sha256:
        bare.note = f"its record `{record}` describes another file (the sha256 differs): numbers not shown"
        return bare
    # the record's numbers are shown only when they follow from its per-window scores, as for a local artifact
    problems = evaluation_problems(m.evaluation, m.gate) if m.evaluation is not None else ["no evaluation"]
    if problems:
        bare.note = f"the numbers in its record `{record}` do not add up ({problems[0]}): not shown"
        return bare
    return _row(m, path, f.size, f.sha256, "already in the repo", str((m.recipe or {}).get("variant") or "") or None,
                record)  # fmt: skip


def _fmt(value: float | None, err: float | None, digits: int, *, signed: bool = False, unit: str = "") -> str:
    if value is None or value != value:
        return "–"
    text = f"{value:+.{digits}f}{unit}" if signed else f"{value:.{digits}f}{unit}"
    return text + (f" ± {err:.{digits}f}" if err is not None and err == err else "")


def _example_quant(rows: list[GGUFFileRow], fresh: list[_Candidate]) -> str:
    types = [c.quant_type for c in fresh] or [r.quant_type for r in rows if r.quant_type]
    return "Q4_K_M" if "Q4_K_M" in types else (types[0] if types else "Q4_K_M")


def render_card(
    repo_id: str,
    rows: list[GGUFFileRow],
    fresh: list[_Candidate],
    left_out: list[LeftOutVariant],
    *,
    revision: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    repo_read: bool = True,
) -> str:
    """The repo's README.md: metadata, the table of every .gguf file, what was left out, how to run, provenance."""
    from llmopt.model_card import _card_classes, _hub_dataset, _metadata_yaml, _recipe_publish, base_model_of
    from llmopt.model_card import license_of as card_license

    ModelCard, ModelCardData, _ = _card_classes()
    first = fresh[0].art
    base = base_model_of(first, base_model)
    lic = card_license(first, license)
    recipe_tags = _recipe_publish(first).get("tags")
    quant_tags = [r.quant_type.lower() for r in rows if r.quant_type]
    tag_list = ["llmopt", "quantized", "gguf", *quant_tags, *(tags or [])]
    tag_list += [str(t) for t in recipe_tags] if isinstance(recipe_tags, list) else []
    datasets: list[str] = []
    for c in fresh:
        m = c.art.manifest
        for spec in (m.calibration.dataset if m.calibration else None, m.evaluation.settings.dataset if m.evaluation
                     else None):  # fmt: skip
            hub_id = _hub_dataset(spec)
            if hub_id:
                datasets.append(hub_id)
    meta: dict[str, Any] = {
        "license": lic,
        "library_name": "gguf",  # the Hub's library id for GGUF repos
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(tag_list)),
    }
    if base:
        meta |= {"base_model": base, "base_model_relation": "quantized"}
    if datasets:
        meta["datasets"] = list(dict.fromkeys(datasets))
    data = ModelCardData(**{k: v for k, v in meta.items() if v is not None})

    name = repo_id.split("/")[-1]
    base_ref = f"[{base}](https://huggingface.co/{base})" if base else f"`{Path(first.manifest.source.model).name}`"
    rev = revision or "main"
    lines = [
        "---",
        _metadata_yaml(data),
        "---",
        "",
        f"# {name}",
        "",
        f"GGUF quantizations of {base_ref} for llama.cpp, one file per quant type, made with llmopt "
        f"{first.manifest.llmopt_version}. Each file was scored against the FP16 model on the same token ids and "
        "published only after passing its quality gate.",
        "",
        "## Files",
        "",
        "| file | quant type | bits per weight | size | perplexity | Δ vs FP16 | mean KLD (nats) | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        link = f"[`{r.path}`](https://huggingface.co/{repo_id}/blob/{rev}/{r.path})"
        if r.gate_passed is None:
            gate = "–"
        else:
            gate = ("✅ passed" if r.gate_passed else "❌ failed") + (
                f" ({', '.join(r.gate_checks)})" if r.gate_checks else ""
            )
        cells = [
            link,
            r.quant_type or "?",
            r.bit_width or "–",
            fmt_bytes(r.size),
            # 4 decimals for a model's perplexity (10-30); fewer for a cut or broken one in the thousands
            _fmt(r.perplexity, r.perplexity_stderr, 4 if (r.perplexity or 0) < 1000 else 1),
            _fmt(r.delta_pct, r.delta_pct_stderr, 2, signed=True, unit="%"),
            _fmt(r.kld_mean, r.kld_stderr, 5),
            gate,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- `{r.path}`: {r.note}" for r in rows if r.note]
    measured = {r.measured_on for r in rows if r.measured_on}
    baselines = {round(r.baseline_perplexity, 6) for r in rows if r.baseline_perplexity is not None}
    lines += [""]
    if len(measured) == 1 and len(baselines) == 1:
        lines.append(
            f"FP16 baseline perplexity {next(iter(baselines)):.4f}; every row was scored on {next(iter(measured))}. "
            "Δ is the paired change in perplexity, ± its standard error; KLD is the mean KL divergence of the "
            "file's next-token distribution from FP16's."
        )
    elif measured:
        lines.append(
            "The rows were not all scored on the same text and windows (or against the same FP16 perplexity): "
            "compare Δ and KLD within a row, not across rows. Each file's record says what it was scored on."
        )
    weights = {r.source_weights for r in rows if r.source_weights}
    if len(weights) > 1:
        lines += ["", "Not every row was quantized from the same source weights: see each file's record."]
    if notes:
        lines += ["", *notes]
    if not repo_read:
        lines += ["", "(Dry run: the repo's other files were not read; this table lists this commit's files.)"]
    if left_out:
        lines += ["", "Left out of this commit (not published):", ""]
        lines += [
            f"- `{lo.variant}`" + (f" ({lo.quant_type})" if lo.quant_type else "") + f": {lo.reason}" for lo in left_out
        ]

    q = _example_quant(rows, fresh)
    example = next((r.path for r in rows if r.quant_type == q), rows[0].path if rows else f"{name}-{q}.gguf")
    lines += ["", "## How to run", ""]
    if revision:
        lines += [
            f"These files are on the branch `{revision}`. Download one, then run it with llama.cpp:",
            "",
            "```bash",
            f"hf download {repo_id} {example} --revision {revision} --local-dir .",
            f"llama-cli -m {example}",
            f"llama-server -m {example}",
            "```",
        ]
    else:
        lines += [
            f"With llama.cpp, which downloads the file of the quant type named after the colon (here {q}):",
            "",
            "```bash",
            f"llama-cli -hf {repo_id}:{q}",
            f"llama-server -hf {repo_id}:{q}   # OpenAI-compatible server on http://localhost:8080",
            "```",
            "",
            "Or download one file and point llama.cpp at it:",
            "",
            "```bash",
            f"hf download {repo_id} {example} --local-dir .",
            f"llama-cli -m {example}",
            "```",
        ]
    lines += [
        "",
        "## Provenance",
        "",
        f"Each file's full llmopt record (quantization options, calibration, the evaluation with its per-window "
        f"scores, the gate, library versions; local paths shortened) is `{RECORD_DIR}/<file>.json`.",
        "",
        "| file | sha256 | variant | record |",
        "|---|---|---|---|",
    ]
    for r in rows:
        rec = f"[`{r.record}`]({r.record})" if r.record else "–"
        lines.append(f"| `{r.path}` | `{r.sha256 or '?'}` | {r.variant or '–'} | {rec} |")
    lines += ["", f"Published by llmopt {__version__}."]
    text = "\n".join(lines).rstrip() + "\n"
    ModelCard(text)  # parsed back by the Hub's own card class: metadata it cannot read fails here
    return text


# --- publishing --------------------------------------------------------------------------------------


def _read_repo(api: Any, repo_id: str, revision: str | None, keep: set[str]) -> _RepoState:
    """The repo's files at ``revision`` (sizes, LFS sha256, head commit) and the records of the ``.gguf`` files
    at its root that are not in ``keep`` (this commit's own files)."""
    from llmopt.hub import hub_call, hub_endpoint

    info = hub_call(
        f"read the files of {repo_id}", api.model_info, repo_id, revision=revision or "main", files_metadata=True
    )
    files = {
        s.rfilename: _RepoFile(size=int(s.size or 0), sha256=s.lfs.sha256 if s.lfs else None)
        for s in (info.siblings or [])
    }
    head = getattr(info, "sha", None)
    records: dict[str, bytes] = {}
    for path in sorted(files):
        record = record_path(path)
        if "/" in path or not path.lower().endswith(".gguf") or path in keep or record not in files:
            continue
        records[record] = hub_call(f"read {record} of {repo_id}", _download, repo_id, record, head or revision,
                                   hub_endpoint())  # fmt: skip
    return _RepoState(head=head, files=files, records=records)


def _download(repo_id: str, path: str, revision: str | None, endpoint: str | None) -> bytes:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint)
    response = get_session().get(url, headers=build_hf_headers(), follow_redirects=True)
    hf_raise_for_status(response)
    return bytes(response.content)


def _rows(sel: _Selection, state: _RepoState | None) -> list[GGUFFileRow]:
    fresh = {c.repo_path: c for c in sel.candidates}
    rows = [
        _row(c.art.manifest, c.repo_path, c.size, c.files[c.gguf_file].sha256, "this commit", c.variant, c.record)
        for c in sel.candidates
    ]
    if state is not None:
        rows += [
            _existing_row(path, f, state.records)
            for path, f in state.files.items()
            if "/" not in path and path.lower().endswith(".gguf") and path not in fresh
        ]
    return sorted(rows, key=lambda r: (-r.size, r.path))


def publish_gguf_repo(
    path: str | Path,
    repo_id: str,
    *,
    only: list[str] | None = None,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    commit_message: str | None = None,
    reporter: Reporter | None = None,
) -> GGUFRepoPublish:
    """Upload the gated GGUF artifacts of a run folder (or one GGUF artifact folder) into ``repo_id`` in one
    commit: one ``.gguf`` file per quant type, its llmopt record, and a README card listing every ``.gguf`` file
    the repo then holds. Raises ``GateFailedError`` (exit 3) when no artifact passed its gate."""
    from llmopt import hub
    from llmopt.model_card import base_model_of, license_of

    rep = reporter if reporter is not None else SilentReporter()
    hub.check_repo_id(repo_id)
    if revision is not None:
        hub.check_branch(revision)
    hub.check_tags(tags)
    if base_model is not None and not HUB_ID.match(base_model):
        raise InputError(f"base model '{base_model}' is not a Hub id.", "Give it as ORG/NAME, or leave it out.")
    with rep.step("checking each artifact's gate and hashes"):
        sel = select(path, only)
    if not sel.candidates and not sel.left_out:  # nothing GGUF at all: a wrong folder, not a failed gate
        raise InputError(
            f"nothing to publish from {path}: it holds no GGUF artifact.",
            "--layout gguf-one-repo publishes a run's GGUF variants; publish other artifacts one by one "
            "(llmopt publish RUN/artifacts/NAME ORG/NAME).",
        )
    if not sel.candidates:
        listed = "; ".join(f"{lo.variant}: {lo.reason}" for lo in sel.left_out)
        raise GateFailedError(
            f"nothing to publish from {path}: no GGUF artifact passed its gate ({listed}).",
            "Only artifacts that pass their gate are published; change the recipe or its gates and run it again.",
        )
    _assign_paths(sel.candidates, model_file_name(sel.candidates, base_model))
    result = GGUFRepoPublish(
        repo_id=repo_id, revision=revision, private=private, dry_run=dry_run, left_out=sel.left_out,
        skipped=sel.skipped,
    )  # fmt: skip
    first = sel.candidates[0].art
    if not license_of(first, license):
        result.notes.append("no license found for the base model: the card has none (pass --license)")
    if not base_model_of(first, base_model):
        result.notes.append("base model unknown (the source is a local folder): pass --base-model ORG/NAME")

    def plan(state: _RepoState | None) -> str:
        rows = _rows(sel, state)
        card = render_card(
            repo_id, rows, sel.candidates, sel.left_out, revision=revision, base_model=base_model,
            license=license, tags=tags, repo_read=state is not None,
        )  # fmt: skip
        uploads: list[UploadedFile] = []
        for c in sel.candidates:
            uploads.append(UploadedFile(path=c.repo_path, size=c.size))
            uploads.append(UploadedFile(path=c.record, size=len(hub.public_manifest(c.art))))
        uploads.append(UploadedFile(path="README.md", size=len(card.encode())))
        result.table = rows
        result.card = card
        result.files = uploads
        result.total_bytes = sum(u.size for u in uploads)
        return card

    if dry_run:
        plan(None)
        result.notes.append("dry run: the repo was not read, so the card lists only this commit's files")
        return result

    hf = hub.require_hub()
    api = hub.hub_api()
    with rep.step(f"creating {repo_id}" + (f" branch {revision}" if revision else "")):
        repo_url = hub.hub_call(
            f"create the repo {repo_id}", api.create_repo, repo_id, private=private, exist_ok=True, repo_type="model"
        )
        if revision:
            hub.hub_call(f"create the branch {revision} of {repo_id}", api.create_branch, repo_id, branch=revision,
                         exist_ok=True)  # fmt: skip
    keep = {c.repo_path for c in sel.candidates}
    types = ", ".join(c.quant_type for c in sel.candidates)
    message = commit_message or (
        f"llmopt: {len(sel.candidates)} GGUF file{'s' if len(sel.candidates) != 1 else ''} ({types}), gate passed"
        + (f"; {len(sel.left_out)} left out" if sel.left_out else "")
    )
    description = f"Published by llmopt {__version__} after each file's gate passed.\n\n" + "\n".join(
        f"- {c.repo_path}: sha256 {c.files[c.gguf_file].sha256}" for c in sel.candidates
    )
    info = None
    for attempt in range(1, ATTEMPTS + 1):
        with rep.step(f"reading what {repo_id} holds"):
            state = _read_repo(api, repo_id, revision, keep)
        if "README.md" in state.files and attempt == 1:
            result.notes.append("the repo's README.md is replaced by the generated card")
        card = plan(state)
        operations = []
        for c in sel.candidates:
            operations.append(
                hf.CommitOperationAdd(path_in_repo=c.repo_path, path_or_fileobj=str(c.art.path / c.gguf_file))
            )
            operations.append(hf.CommitOperationAdd(path_in_repo=c.record, path_or_fileobj=hub.public_manifest(c.art)))
        operations.append(hf.CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
        with rep.step(f"uploading {len(operations)} files ({fmt_bytes(result.total_bytes)}) in one commit"):
            info = hub.hub_call(f"commit to {repo_id}", _commit_unless_moved, api, repo_id, operations, message,
                                description, revision, state.head)  # fmt: skip
        if info is not None:
            break
        rep.info(f"{repo_id} changed while publishing: reading it again ({attempt}/{ATTEMPTS})")
    if info is None:
        raise hub.HubError(
            f"{repo_id} kept changing while publishing ({ATTEMPTS} attempts): another commit landed each time "
            "between reading the repo and committing. Nothing was committed.",
            "Publish again when the other uploads to that repo are done.",
        )
    result.url = str(repo_url) if repo_url else None
    result.commit_url = getattr(info, "commit_url", None)
    result.commit_oid = getattr(info, "oid", None)
    result.commit_message = message
    return result


def _commit_unless_moved(
    api: Any, repo_id: str, operations: list[Any], message: str, description: str, revision: str | None,
    parent: str | None,
) -> Any:  # fmt: skip
    """``create_commit`` on top of ``parent``; None when the branch moved since: the Hub answers 412 to a stale
    ``parent_commit`` (409, a conflict, is taken the same way)."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message,
            commit_description=description,
            revision=revision,
            repo_type="model",
            parent_commit=parent,
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        if parent is not None and status in (409, 412):
            return None
        raise
