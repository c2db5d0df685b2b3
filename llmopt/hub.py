"""Publish an artifact to the Hugging Face Hub, behind its gate, with a generated model card.

``publish`` refuses an artifact whose manifest has no passing gate (exit 3), or whose files are not the
ones its evaluation saw (exit 5). The upload is one commit: the artifact's files, its ``llmopt.json``
and a ``README.md`` model card (model_card.py; the card is never written into the artifact folder,
whose file hashes must not change). ``dry_run`` renders the card and lists the files without any network call.

``benchmarks`` (opt-in, ``--benchmark TASK=DATASET_ID:TASK_ID``) adds, to the same commit, one
``.eval_results/TASK.yaml`` per lm-eval task the user maps to a Hub benchmark
(https://huggingface.co/docs/hub/eval-results): the artifact's score of the task's primary metric, in %.

The uploaded ``llmopt.json`` is the artifact's manifest with the user's local paths (model folder, texts,
recipe, artifact folder) cut to their last component under ``<local>/``: a public repo never shows the
publisher's home folder. The numbers, hashes and gate are unchanged.

The token comes from ``HF_TOKEN`` or ``huggingface_hub``'s saved login, and is only ever handed to
``huggingface_hub``: llmopt never prints, logs or writes it. ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PureWindowsPath
from typing import Any
from urllib.parse import quote

from llmopt import __version__
from llmopt.artifact import MANIFEST_NAME, Artifact, FileEntry, files_digest, hash_tree
from llmopt.errors import ArtifactError, BackendUnavailableError, GateFailedError, InputError
from llmopt.evaluate.gate import require_consistent
from llmopt.model_card import (
    CARD_NAME,
    Benchmark,
    base_model_of,
    benchmark_result,
    eval_results_yaml,
    license_of,
    render_card,
    task_hub_dataset,
)
from llmopt.progress import Reporter, SilentReporter
from llmopt.source import HUB_ID
from llmopt.units import fmt_bytes

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
# an lm-eval task name as reports and the card name it; also the file name under .eval_results/
_TASK = re.compile(r"^[A-Za-z0-9][\w.-]*$")
BENCHMARK_SYNTAX = "TASK=DATASET_ID:TASK_ID"
_BENCHMARK_EXAMPLE = "e.g. arc_easy=allenai/ai2_arc:ARC-Easy"


class HubError(BackendUnavailableError):
    """The Hub could not be reached, or refused the upload for a reason that is not the user's input."""


# --- checks ----------------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> None:
    bad = (
        not _REPO_ID.match(repo_id)
        or len(repo_id.split("/")[-1]) > 96
        or "--" in repo_id
        or ".." in repo_id
        or repo_id.endswith((".", "-", ".git"))
    )
    if bad:
        raise InputError(
            f"'{repo_id}' is not a valid Hub repo id.",
            "Use ORG/NAME with letters, digits, '-', '_' or '.' (no '--' or '..', at most 96 characters).",
        )


def check_branch(branch: str) -> None:
    if not _BRANCH.match(branch) or ".." in branch or branch.startswith("refs/") or branch.endswith((".lock", "/")):
        raise InputError(f"'{branch}' is not a valid branch name.", "Use letters, digits, '.', '_', '-' or '/'.")


def check_publishable(art: Artifact) -> dict[str, FileEntry]:
    """Raise unless the artifact passed a real gate on exactly the files it holds now; return those files."""
    m = art.manifest
    if m.evaluation is None or m.gate is None:
        raise GateFailedError(
            f"{art.path} has not been evaluated, so it has no gate to pass.",
            f"Run `llmopt eval {art.path} --baseline MODEL --dataset TEXT --max-ppl-increase PCT` first.",
        )
    if not m.gate.checks:
        raise GateFailedError(
            f"{art.path} was evaluated with no gate thresholds: nothing says it is good enough to publish.",
            "Evaluate it again with a threshold, e.g. `llmopt eval ... --max-ppl-increase 5`.",
        )
    # The flag and the summary numbers are only believed when they follow from the raw window scores.
    require_consistent(m.evaluation, m.gate, str(art.path))
    if not m.gate.passed:
        failed = "; ".join(c.message for c in m.gate.failures())
        raise GateFailedError(
            f"{art.path} did not pass its gate: {failed}.",
            "Only artifacts that pass their gate are published; pick another variant or change the recipe.",
        )
    current = hash_tree(art.path)
    if m.evaluation.artifact_files_sha256 != files_digest(current):
        changed = sorted(
            [rel for rel in current if rel not in m.files or m.files[rel].sha256 != current[rel].sha256]
            + [f"{rel} (missing)" for rel in m.files if rel not in current]
        )
        listed = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise ArtifactError(
            f"{art.path}: the files are not the ones its evaluation saw"
            + (f" ({listed})" if changed else " (the manifest's file table was changed)")
            + ".",
            "Re-create the artifact (`llmopt quantize --overwrite`) and evaluate it again before publishing.",
        )
    table = {rel: e.sha256 for rel, e in m.files.items()}
    if table != {rel: e.sha256 for rel, e in current.items()}:
        odd = sorted(set(table) ^ set(current)) or sorted(r for r in table if table[r] != current[r].sha256)
        raise ArtifactError(
            f"{art.path}: its {MANIFEST_NAME} lists other files than the folder holds ({', '.join(odd[:5])}), "
            "so the manifest that would be published does not describe the upload.",
            "Re-create the artifact (`llmopt quantize --overwrite`) and evaluate it again before publishing.",
        )
    return current


def check_tags(tags: list[str] | None) -> None:
    """Extra model card tags: each a non-empty line of text (an empty tag went into the card's metadata as '')."""
    for tag in tags or []:
        if not isinstance(tag, str) or not tag.strip():
            raise InputError(f"--tag {tag!r} is empty.", "Give each --tag a name (e.g. --tag int8), or leave it out.")
        if any(ch in tag for ch in "\r\n\t") or not tag.isprintable():
            raise InputError(
                f"--tag {tag!r} holds a line break or a control character.", "Give each --tag as one word or phrase."
            )


def parse_benchmark(entry: str) -> Benchmark:
    """One ``TASK=DATASET_ID:TASK_ID`` mapping: an lm-eval task to a Hub benchmark dataset and its task id.

    Only the form is checked (a valid Hub repo id, a task id of one line): whether the dataset is registered as a
    Benchmark and defines that task, only the Hub knows."""
    task, eq, target = entry.partition("=")
    task, target = task.strip(), target.strip()
    if not eq:
        raise InputError(
            f"benchmark mapping {entry!r} has no '='.", f"Write it as {BENCHMARK_SYNTAX} ({_BENCHMARK_EXAMPLE})."
        )
    if "://" in target or target.lower().startswith(("http:", "https:", "hf:")):
        raise InputError(
            f"benchmark mapping {entry!r} gives an address, not a Hub dataset id.",
            f"Give the dataset as owner/name ({_BENCHMARK_EXAMPLE}).",
        )
    dataset_id, colon, task_id = target.partition(":")
    dataset_id, task_id = dataset_id.strip(), task_id.strip()
    if not colon or not task_id:
        raise InputError(
            f"benchmark mapping {entry!r} names no task id of the benchmark (the part after ':').",
            f"Write it as {BENCHMARK_SYNTAX} ({_BENCHMARK_EXAMPLE}); the task id is one of the benchmark "
            "dataset's eval.yaml.",
        )
    if not _TASK.match(task):
        raise InputError(
            f"benchmark mapping {entry!r}: {task!r} is not an lm-eval task name.",
            f"Start it with the task as the evaluation ran it ({_BENCHMARK_EXAMPLE}).",
        )
    try:
        check_repo_id(dataset_id)
    except InputError as exc:
        raise InputError(f"benchmark mapping {entry!r}: {exc.message}", exc.hint) from None
    if not task_id.isprintable():
        raise InputError(
            f"benchmark mapping {entry!r}: the task id holds a control character.",
            "Give the task id as the benchmark's eval.yaml spells it.",
        )
    return Benchmark(task=task, dataset_id=dataset_id, task_id=task_id)


def parse_benchmarks(mappings: Sequence[str] | Mapping[str, str] | None) -> list[Benchmark]:
    """``--benchmark`` values (or a recipe's ``publish.benchmarks``, task -> ``DATASET_ID:TASK_ID``), checked;
    a task mapped twice is refused (the repo holds one result file per task)."""
    if isinstance(mappings, Mapping):
        entries = [f"{task}={target}" for task, target in mappings.items()]
    else:
        entries = list(mappings or [])
    out: list[Benchmark] = []
    for entry in entries:
        b = parse_benchmark(entry)
        twice = next((o for o in out if o.task == b.task), None)
        if twice is not None:
            raise InputError(
                f"task '{b.task}' is mapped twice ({twice.dataset_id}:{twice.task_id} and "
                f"{b.dataset_id}:{b.task_id}); the repo holds one result file per task.",
                "Keep one mapping per task.",
            )
        out.append(b)
    return out


def record_url(repo_id: str, revision: str | None) -> str:
    """The address of the published ``llmopt.json`` (the per-example scores behind a benchmark result)."""
    base = (hub_endpoint() or "https://huggingface.co").rstrip("/")
    return f"{base}/{repo_id}/blob/{quote(revision or 'main', safe='')}/{MANIFEST_NAME}"


# --- publishing ------------------------------------------------------------------------------------


def require_hub() -> Any:
    """The huggingface_hub module, or exit 4 with the install line."""
    try:
        import huggingface_hub
    except ImportError:
        raise BackendUnavailableError(
            "publishing needs huggingface_hub.",
            "pip install 'llmopt[hub]'  (or: pip install huggingface_hub)",
        ) from None
    return huggingface_hub


def hub_endpoint() -> str | None:
    """The Hub llmopt talks to: ``HF_ENDPOINT`` when set, else None (huggingface_hub's default)."""
    return os.environ.get("HF_ENDPOINT") or None


def hub_api() -> Any:
    """An ``HfApi`` for the endpoint, once a token is known (else bad input: no token)."""
    hf = require_hub()
    if not hf.get_token():
        raise InputError(
            "no Hugging Face token found.",
            "Set HF_TOKEN to a token with write access, or run `hf auth login`.",
        )
    return hf.HfApi(endpoint=hub_endpoint())


def hub_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call huggingface_hub, turning HTTP and network failures into one clear line."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return fn(*args, **kwargs)
    except OfflineModeIsEnabled:
        raise InputError(
            f"cannot {what}: huggingface_hub is in offline mode (HF_HUB_OFFLINE is set).",
            "Unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) to publish.",
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else None
        server = (getattr(exc, "server_message", None) or "").strip().splitlines()
        detail = f": {server[0]}" if server else ""
        if status == 401:
            raise InputError(
                f"the Hub did not accept the token when trying to {what} (401){detail}.",
                "Set HF_TOKEN to a valid token with write access, or run `hf auth login`.",
            ) from None
        if status == 403:
            raise InputError(
                f"no permission to {what} (403){detail}.",
                "Use a token with write access to that namespace, or publish under another organization.",
            ) from None
        if status == 404:
            raise InputError(
                f"not found when trying to {what} (404){detail}.",
                "Check the repo id and branch, and that the token can see the repo.",
            ) from None
        raise HubError(
            f"the Hub answered {status} when trying to {what}{detail}.",
            "Try again later; nothing was published unless the commit step succeeded.",
        ) from None
    except Exception as exc:
        if _is_network(exc):
            raise HubError(
                f"could not reach the Hub ({hub_endpoint() or 'huggingface.co'}) to {what}: {type(exc).__name__}.",
                "Check the network (and HF_ENDPOINT if set), then publish again.",
            ) from None
        # huggingface_hub wraps a failed LFS transfer as RuntimeError("Error while uploading 'X' to the Hub.")
        cause = _network_cause(exc)
        if cause is not None:
            raise HubError(
                f"the upload to the Hub ({hub_endpoint() or 'huggingface.co'}) broke off while trying to {what}: "
                f"{exc} ({type(cause).__name__}). Nothing was committed and the artifact is unchanged.",
                "Check the network, then publish again (files already uploaded are not sent twice).",
            ) from None
        raise


def _is_network(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    module = type(exc).__module__.split(".")[0]
    return module.startswith("httpx") or isinstance(exc, ConnectionError | TimeoutError | HfHubHTTPError)


def _network_cause(exc: BaseException) -> BaseException | None:
    """The network error an exception was raised from, if any (following ``raise ... from`` links)."""
    seen: set[int] = set()
    current = exc.__cause__ or exc.__context__
    while current is not None and id(current) not in seen:
        if _is_network(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def ensure_ready(organization: str | None = None) -> str | None:
    """Fail fast, before any quantization, when publishing cannot work: no library, no token.

    Returns the organization for repo ids: the one given, else the user the token belongs to.
    """
    api = hub_api()
    if organization:
        return organization
    who = hub_call("read who the token belongs to", api.whoami)
    return str(who.get("name")) if isinstance(who, dict) and who.get("name") else None


def _is_local_path(value: str) -> bool:
    # a path relative to where the user ran llmopt (``../../alice/models/x``) names their folders as much as an
    # absolute one; a Hub id (``org/name``) never starts with a dot
    relative = value in (".", "..") or value.startswith(("./", "../", ".\\", "..\\"))
    return relative or value.startswith(("/", "~", "\\\\")) or bool(PureWindowsPath(value).drive)


def _without_local_paths(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_local_paths(v) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        name = PureWindowsPath(value).name if PureWindowsPath(value).drive or "\\" in value else Path(value).name
        return f"<local>/{name}"
    return value


def public_manifest(art: Artifact) -> bytes:
    """The manifest as uploaded: every absolute local path cut to ``<local>/NAME``; all else as stored."""
    data = json.loads(art.manifest_path.read_text(encoding="utf-8"))
    return (json.dumps(_without_local_paths(data), indent=2) + "\n").encode("utf-8")


def upload_list(art: Artifact, files: dict[str, FileEntry]) -> list[dict[str, Any]]:
    """What one commit uploads: the artifact's files, its manifest (local paths cut), and the generated card."""
    items: list[dict[str, Any]] = [
        {"path": rel, "size": e.size, "source": "artifact"} for rel, e in sorted(files.items()) if rel != CARD_NAME
    ]
    items.append({"path": MANIFEST_NAME, "size": len(public_manifest(art)), "source": "manifest"})
    return items


def publish(
    artifact_path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    commit_message: str | None = None,
    benchmarks: Sequence[str] | Mapping[str, str] | None = None,
    benchmark_local_data: bool = False,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Upload a gated artifact and its model card to ``repo_id`` (on branch ``revision``) in one commit.

    ``benchmarks``: lm-eval tasks of the stored evaluation mapped to Hub benchmarks (``TASK=DATASET_ID:TASK_ID``,
    or a mapping task -> ``DATASET_ID:TASK_ID``), each published as ``.eval_results/TASK.yaml`` in the same commit;
    ``benchmark_local_data``: the user states that a mapped local task's data is the benchmark's own.

    Returns what was (or, with ``dry_run``, would be) uploaded: repo id, branch, files with sizes, the
    card, the benchmark results, and the commit's URL and id.
    """
    rep = reporter if reporter is not None else SilentReporter()
    check_repo_id(repo_id)
    if revision is not None:
        check_branch(revision)
    check_tags(tags)
    mapped = parse_benchmarks(benchmarks)
    if base_model is not None and not HUB_ID.match(base_model):
        raise InputError(f"base model '{base_model}' is not a Hub id.", "Give it as ORG/NAME, or leave it out.")
    art = Artifact.open(artifact_path)
    with rep.step("checking the gate and the artifact's hashes"):
        files = check_publishable(art)
    source_url = record_url(repo_id, revision)
    results = {b.path: benchmark_result(art, b, local_data=benchmark_local_data, source_url=source_url) for b in mapped}
    card = render_card(
        art,
        repo_id,
        revision=revision,
        base_model=base_model,
        license=license,
        tags=tags,
        files=files,
        benchmarks=mapped,
    )
    items = [i for i in upload_list(art, files) if i["path"] not in results]
    items.append({"path": CARD_NAME, "size": len(card.encode()), "source": "generated model card"})
    items += [
        {"path": path, "size": len(eval_results_yaml(e)), "source": "benchmark result"} for path, e in results.items()
    ]
    notes: list[str] = []
    notes += [f"the artifact's own {path} is replaced by the benchmark result" for path in results if path in files]
    notes += _benchmark_notes(art, mapped)
    if CARD_NAME in files:
        notes.append(f"the artifact's own {CARD_NAME} is replaced by the generated model card")
    if not license_of(art, license):
        notes.append("no license found for the base model: the card has none (pass --license)")
    if not base_model_of(art, base_model):
        notes.append("base model unknown (the source is a local folder): pass --base-model ORG/NAME")
    result: dict[str, Any] = {
        "repo_id": repo_id,
        "revision": revision,
        "private": private,
        "dry_run": dry_run,
        "files": [{"path": i["path"], "size": i["size"]} for i in items],
        "total_bytes": sum(i["size"] for i in items),
        "card": card,
        "eval_results": [{"path": path, "entry": e} for path, e in results.items()],
        "notes": notes,
        "url": None,
        "commit_url": None,
        "commit_oid": None,
    }
    if dry_run:
        return result

    hf = require_hub()
    api = hub_api()
    ev = art.manifest.evaluation
    ppl = ev.artifact.perplexity if ev else float("nan")
    delta = ev.delta_pct if ev and ev.delta_pct is not None else float("nan")
    message = commit_message or (
        f"llmopt: {art.manifest.backend} ({art.manifest.format}), perplexity "
        f"{ppl:.4f} ({delta:+.2f}% vs FP16), gate passed"
    )
    description = (
        f"Published by llmopt {__version__} after its gate passed.\n\n"
        f"Files digest (sha256 over the file table the evaluation saw): {files_digest(files)}"
    )
    with rep.step(f"creating {repo_id}" + (f" branch {revision}" if revision else "")):
        repo_url = hub_call(
            f"create the repo {repo_id}",
            api.create_repo,
            repo_id,
            private=private,
            exist_ok=True,
            repo_type="model",
        )
        if revision:
            hub_call(
                f"create the branch {revision} of {repo_id}",
                api.create_branch,
                repo_id,
                branch=revision,
                exist_ok=True,
            )
    operations = [
        hf.CommitOperationAdd(path_in_repo=i["path"], path_or_fileobj=str(art.path / i["path"]))
        for i in items
        if i["source"] == "artifact"
    ]
    operations.append(hf.CommitOperationAdd(path_in_repo=MANIFEST_NAME, path_or_fileobj=public_manifest(art)))
    operations.append(hf.CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
    operations += [
        hf.CommitOperationAdd(path_in_repo=path, path_or_fileobj=eval_results_yaml(e)) for path, e in results.items()
    ]
    with rep.step(f"uploading {len(operations)} files ({fmt_bytes(result['total_bytes'])}) in one commit"):
        info = hub_call(
            f"commit to {repo_id}",
            api.create_commit,
            repo_id,
            operations=operations,
            commit_message=message,
            commit_description=description,
            revision=revision,
            repo_type="model",
        )
    result["url"] = str(repo_url) if repo_url else None
    result["commit_url"] = getattr(info, "commit_url", None)
    result["commit_oid"] = getattr(info, "oid", None)
    result["commit_message"] = message
    return result


def _benchmark_notes(art: Artifact, mapped: list[Benchmark]) -> list[str]:
    """A mapped Hub task whose data lm-eval read from another dataset than the benchmark's: said, not refused
    (a benchmark may be registered under another repo than the one lm-eval reads), since the claim is the user's."""
    ev = art.manifest.evaluation
    scores = ev.artifact.tasks.scores if ev and ev.artifact.tasks else []
    notes = []
    for b in mapped:
        read = next((task_hub_dataset(s) for s in scores if s.task == b.task), None)
        if read and read != b.dataset_id:
            notes.append(f"lm-eval read {b.task}'s data from {read}, which is not the benchmark {b.dataset_id}")
    return notes
