"""Publish an artifact to the Hugging Face Hub, behind its gate, with a generated model card.

``publish`` refuses an artifact whose manifest has no passing gate (exit 3), or whose files are not the
ones its evaluation saw (exit 5). The upload is one commit: the artifact's files, its ``llmopt.json``
and a ``README.md`` model card rendered here (the card is never written into the artifact folder, whose
file hashes must not change). ``dry_run`` renders the card and lists the files without any network call.

The token comes from ``HF_TOKEN`` or ``huggingface_hub``'s saved login, and is only ever handed to
``huggingface_hub``: llmopt never prints, logs or writes it. ``HF_ENDPOINT`` selects another Hub.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from llmopt import __version__
from llmopt.artifact import MANIFEST_NAME, Artifact, FileEntry, files_digest, hash_tree
from llmopt.errors import ArtifactError, BackendUnavailableError, GateFailedError, InputError
from llmopt.evaluate.gate import require_consistent
from llmopt.progress import Reporter, SilentReporter

CARD_NAME = "README.md"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_HUB_MODEL = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
    checks = m.gate.get("checks") or []
    if not checks:
        raise GateFailedError(
            f"{art.path} was evaluated with no gate thresholds: nothing says it is good enough to publish.",
            "Evaluate it again with a threshold, e.g. `llmopt eval ... --max-ppl-increase 5`.",
        )
    # The flag and the summary numbers are only believed when they follow from the raw window scores.
    require_consistent(m.evaluation, m.gate, str(art.path))
    if not m.gate.get("passed"):
        failed = "; ".join(c.get("message", c.get("name", "?")) for c in checks if not c.get("passed"))
        raise GateFailedError(
            f"{art.path} did not pass its gate: {failed}.",
            "Only artifacts that pass their gate are published; pick another variant or change the recipe.",
        )
    current = hash_tree(art.path)
    if m.evaluation.get("artifact_files_sha256") != files_digest(current):
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


# --- model card ------------------------------------------------------------------------------------


def _bits(manifest_format: str, options: dict[str, Any]) -> int | None:
    if isinstance(options.get("bits"), int):
        return int(options["bits"])
    m = re.search(r"(\d+)bit", manifest_format.replace("-", ""))
    return int(m.group(1)) if m else None


def source_license(art: Artifact) -> str | None:
    """The license of the model quantized, from its README front matter or config.json, if present."""
    root = Path(art.manifest.source.resolved_path)
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            if end > 0:
                import yaml

                try:
                    meta = yaml.safe_load(text[3:end])
                except yaml.YAMLError:
                    meta = None
                if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                    return str(meta["license"])
    config = root / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("license")
        except ValueError:
            value = None
        if isinstance(value, str):
            return value
    return None


def _recipe_publish(art: Artifact) -> dict[str, Any]:
    """The ``publish`` section of the recipe the artifact was made from (empty when none)."""
    resolved = (art.manifest.recipe or {}).get("resolved") or {}
    section = resolved.get("publish") if isinstance(resolved, dict) else None
    return section if isinstance(section, dict) else {}


def license_of(art: Artifact, explicit: str | None = None) -> str | None:
    """The card's license: given, else the recipe's ``publish.license``, else the source model's own."""
    if explicit:
        return explicit
    from_recipe = _recipe_publish(art).get("license")
    if isinstance(from_recipe, str) and from_recipe:
        return from_recipe
    return source_license(art)


def _recipe_base_model(art: Artifact) -> str | None:
    resolved = (art.manifest.recipe or {}).get("resolved") or {}
    base = _recipe_publish(art).get("base_model")
    if base:
        return str(base)
    source = (resolved.get("model") or {}).get("source")
    if isinstance(source, str) and _HUB_MODEL.match(source) and not Path(source).exists():
        return source
    return None


def base_model_of(art: Artifact, explicit: str | None = None) -> str | None:
    """Hub id of the model quantized: given, else from the recipe, else the source when it is a Hub id."""
    if explicit:
        return explicit
    found = _recipe_base_model(art)
    if found:
        return found
    src = art.manifest.source.model
    if _HUB_MODEL.match(src) and not Path(src).expanduser().exists():
        return src
    return None


def _public(value: Any) -> Any:
    """Local paths shortened to their last part: a model card must not show the machine's folders."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and (value.startswith(("/", "~", "./", "../")) or re.match(r"^[A-Za-z]:\\", value)):
        return ".../" + Path(value).name
    return value


def _how_to_load(fmt: str, repo_id: str, revision: str | None) -> list[str]:
    rev = f', revision="{revision}"' if revision else ""
    rev_cli = f" --revision {revision}" if revision else ""
    py = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}"{rev}, device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}"{rev})',
        "```",
    ]
    if fmt == "gptq":
        return [
            "With transformers (needs `pip install gptqmodel optimum`):",
            "",
            *py,
            "",
            "With vLLM (GPTQ is detected from `quantization_config`):",
            "",
            "```bash",
            f"vllm serve {repo_id}{rev_cli}",
            "```",
        ]
    if fmt == "awq":
        return [
            "With transformers (needs `pip install gptqmodel optimum`):",
            "",
            *py,
            "",
            "With vLLM (AWQ is detected from `quantization_config`; vLLM picks its fastest AWQ kernel):",
            "",
            "```bash",
            f"vllm serve {repo_id}{rev_cli}",
            "```",
        ]
    if fmt.startswith("bnb"):
        lines = ["With transformers (needs `pip install bitsandbytes accelerate`):", "", *py]
        if fmt == "bnb-4bit":
            lines += [
                "",
                "With vLLM:",
                "",
                "```bash",
                f"vllm serve {repo_id}{rev_cli} --quantization bitsandbytes",
                "```",
            ]
        return lines
    if fmt == "gguf":
        return [
            "With llama.cpp:",
            "",
            "```bash",
            f"llama-cli -hf {repo_id}",
            "```",
        ]
    return ["With transformers:", "", *py]


def _dtype_cell(value: Any) -> str:
    """The dtype a side was scored in, as the evaluation recorded it; never a guess."""
    return f"`{value}`" if isinstance(value, str) and value else "not recorded"


def _scored_baseline(art: Artifact, baseline: dict[str, Any], base_model: str | None) -> dict[str, str]:
    """What the baseline row may claim: the model that was actually scored, by Hub id only when it was one.

    A local folder is named by its last path part and its weights' sha256 (when the manifest has them for
    that folder); a card must not present a local rebuild as the Hub model it may have come from.
    """
    scored = str(baseline.get("model") or "")
    local = not (_HUB_MODEL.match(scored) and not Path(scored).expanduser().exists()) if scored else True
    if scored and not local:
        return {"label": scored}
    src = art.manifest.source
    name = Path(scored).name if scored else Path(src.model).name
    same_as_source = (
        not scored
        or scored in (src.model, src.resolved_path)
        or (Path(scored).expanduser().resolve() == Path(src.resolved_path).expanduser().resolve())
    )
    hashes = src.weights_sha256 if same_as_source else {}
    if hashes:
        digest = ", ".join(f"`{k}` sha256 `{v[:16]}…`" for k, v in sorted(hashes.items()))
        label = f"local `{name}`, {digest}"
    else:
        label = f"local `{name}`, weights not hashed in the manifest"
    note = ""
    if base_model:
        note = (
            f"The FP16 baseline scored was a local copy (`{name}`), identified by its weights' sha256 in the table; "
            f"it was not downloaded from [{base_model}](https://huggingface.co/{base_model}) for this evaluation."
        )
    return {"label": label, "note": note}


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def render_card(
    art: Artifact,
    repo_id: str,
    *,
    revision: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    files: dict[str, FileEntry] | None = None,
) -> str:
    """The model card (README.md): YAML metadata, evaluation against FP16, recipe, provenance, usage."""
    import yaml

    m = art.manifest
    ev = m.evaluation or {}
    gate = m.gate or {}
    options = {k: v for k, v in m.options.items() if k != "_resolved"}
    bits = _bits(m.format, options)
    base = base_model_of(art, base_model)
    lic = license_of(art, license)

    meta: dict[str, Any] = {}
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized"
    if lic:
        meta["license"] = lic
    if m.format != "gguf":
        meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    family = {"bnb-4bit": "bitsandbytes", "bnb-8bit": "bitsandbytes"}.get(m.format, m.format)
    tag_list = ["llmopt", "quantized", family, m.backend]
    if bits:
        tag_list.append(f"{bits}-bit")
    recipe_tags = _recipe_publish(art).get("tags")
    for t in [*(tags or []), *(recipe_tags if isinstance(recipe_tags, list) else [])]:
        tag_list.append(str(t))
    meta["tags"] = list(dict.fromkeys(tag_list))

    name = repo_id.split("/")[-1]
    base_ref = f"[{base}](https://huggingface.co/{base})" if base else f"`{Path(m.source.model).name}`"
    s = ev.get("settings") or {}
    b = ev.get("baseline") or {}
    a = ev.get("artifact") or {}
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{bits}-bit " if bits else "",
    ]
    lines[-1] += (
        f"{m.backend} quantization (`{m.format}` format) of {base_ref}, made with "
        # no link: llmopt has no registry page or public home of its own, and a link to an unclaimed
        # package name is one anyone could take over
        f"llmopt {m.llmopt_version} and published only after passing "
        "its quality gate."
    )
    lines += ["", "## Evaluation against FP16", ""]
    if s:
        lines.append(
            f"Perplexity on `{_public(s.get('dataset'))}` "
            f"(text sha256 `{str(s.get('text_sha256', ''))[:16]}…`): "
            f"{s.get('tokens_scored', 0):,} tokens scored in windows of {s.get('context_length')} "
            f"(stride {s.get('stride')}{', BOS added' if s.get('add_bos') else ''}) on "
            f"**{s.get('device', '?')}**. Both models were scored on exactly the same token ids."
        )
        lines.append("")
    scored_base = _scored_baseline(art, b, base)
    if scored_base.get("note"):
        lines += [scored_base["note"], ""]
    throughput = ev.get("throughput") or {}
    speed = throughput.get("decode_speedup") or {}
    speed_col = bool(speed)
    header = ["model", "scored in", "perplexity", "± stderr", "Δ vs FP16", "size on disk", "in memory"]
    if speed_col:
        header.append("decode speedup")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if b:
        row = [
            f"FP16 baseline ({scored_base['label']})",
            _dtype_cell(b.get("dtype")),
            f"{b.get('perplexity', 0):.4f}",
            f"{b.get('stderr', 0):.4f}",
            "–",
            _fmt_bytes(b.get("size_bytes")),
            _fmt_bytes(b.get("footprint_bytes")),
        ]
        lines.append("| " + " | ".join(row + (["1.00x"] if speed_col else [])) + " |")
    if a:
        delta = ev.get("delta_pct")
        dse = ev.get("delta_pct_stderr")
        row = [
            f"**this model** ({m.backend})",
            # before the evaluation recorded a dtype per side, settings.dtype was the artifact's
            _dtype_cell(a.get("dtype") or s.get("dtype")),
            f"{a.get('perplexity', 0):.4f}",
            f"{a.get('stderr', 0):.4f}",
            ("–" if delta is None else f"{delta:+.2f}%") + (f" ± {dse:.2f}" if dse is not None else ""),
            _fmt_bytes(a.get("size_bytes")),
            _fmt_bytes(a.get("footprint_bytes")),
        ]
        if speed_col:
            row.append(
                ", ".join(
                    f"{float(v):.2f}x @ batch {k}"
                    for k, v in sorted(speed.items(), key=lambda kv: int(kv[0]))
                    if v is not None
                )
            )
        lines.append("| " + " | ".join(row) + " |")
    if gate.get("checks"):
        lines += ["", "**Gate** (all must pass to publish):", ""]
        lines += [f"- {'✅' if c.get('passed') else '❌'} {c.get('message')}" for c in gate["checks"]]

    lines += ["", "## How to use", ""]
    lines += _how_to_load(m.format, repo_id, revision)

    lines += [
        "",
        "## Quantization",
        "",
        f"- method: `{m.backend}`, format `{m.format}`, loaded by `{m.runner}`",
    ]
    if m.quantize_seconds is not None:
        lines.append(f"- quantized in {m.quantize_seconds:.1f} s on {m.environment.device}")
    if m.calibration:
        c = m.calibration
        lines.append(
            f"- calibration: `{_public(c.dataset)}`, {c.samples} samples × {c.seq_len} tokens "
            f"(token ids sha256 `{c.tokens_sha256[:16]}…`)"
        )
    else:
        lines.append("- calibration: none (this method needs none)")
    lines += ["", "Options:", "", "```yaml", yaml.safe_dump(options, sort_keys=True).rstrip(), "```"]

    resolved = (m.recipe or {}).get("resolved")
    if resolved:
        variant = (m.recipe or {}).get("variant")
        lines += [
            "",
            "## Recipe",
            "",
            f"The llmopt recipe this artifact was made from{f' (variant `{variant}`)' if variant else ''}; "
            "local paths are shortened.",
            "",
            "```yaml",
            yaml.safe_dump(_public(resolved), sort_keys=False, allow_unicode=True).rstrip(),
            "```",
        ]

    lines += ["", "## Provenance", ""]
    lines.append(f"- llmopt {m.llmopt_version} (manifest schema {m.schema_version}), created {m.created_at}")
    if m.source.weights_sha256:
        lines.append(
            "- source weights sha256: " + ", ".join(f"`{k}` `{v}`" for k, v in m.source.weights_sha256.items())
        )
    table = files or m.files
    lines.append(f"- files digest (what the evaluation saw): `{files_digest(table)}`")
    env = ev.get("environment") or m.environment.model_dump()
    pk = env.get("packages") or {}
    if pk:
        lines.append("- evaluated with: " + ", ".join(f"{k} {v}" for k, v in sorted(pk.items())))
    lines.append(f"- python {env.get('python', '?')} on {env.get('platform', '?')}")
    lines += ["", "| file | size | sha256 |", "|---|---|---|"]
    lines += [f"| `{rel}` | {e.size:,} | `{e.sha256}` |" for rel, e in sorted(table.items())]
    lines += ["", f"The full record is in [`{MANIFEST_NAME}`]({MANIFEST_NAME})."]
    return "\n".join(lines).rstrip() + "\n"


# --- publishing ------------------------------------------------------------------------------------


def _require_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise BackendUnavailableError(
            "publishing needs huggingface_hub.",
            "pip install 'llmopt[hub]'  (or: pip install huggingface_hub)",
        ) from None
    return huggingface_hub


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _api() -> Any:
    hf = _require_hub()
    if not hf.get_token():
        raise InputError(
            "no Hugging Face token found.",
            "Set HF_TOKEN to a token with write access, or run `hf auth login`.",
        )
    return hf.HfApi(endpoint=_endpoint())


def _hub_call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
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
                f"could not reach the Hub ({_endpoint() or 'huggingface.co'}) to {what}: {type(exc).__name__}.",
                "Check the network (and HF_ENDPOINT if set), then publish again.",
            ) from None
        # huggingface_hub wraps a failed LFS transfer as RuntimeError("Error while uploading 'X' to the Hub.")
        cause = _network_cause(exc)
        if cause is not None:
            raise HubError(
                f"the upload to the Hub ({_endpoint() or 'huggingface.co'}) broke off while trying to {what}: "
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
    api = _api()
    if organization:
        return organization
    who = _hub_call("read who the token belongs to", api.whoami)
    return str(who.get("name")) if isinstance(who, dict) and who.get("name") else None


def upload_list(art: Artifact, files: dict[str, FileEntry]) -> list[dict[str, Any]]:
    """What one commit uploads: the artifact's files, its manifest, and the generated card."""
    items = [
        {"path": rel, "size": e.size, "source": "artifact"} for rel, e in sorted(files.items()) if rel != CARD_NAME
    ]
    items.append({"path": MANIFEST_NAME, "size": art.manifest_path.stat().st_size, "source": "manifest"})
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
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Upload a gated artifact and its model card to ``repo_id`` (on branch ``revision``) in one commit.

    Returns what was (or, with ``dry_run``, would be) uploaded: repo id, branch, files with sizes, the
    card, and the commit's URL and id.
    """
    rep = reporter if reporter is not None else SilentReporter()
    check_repo_id(repo_id)
    if revision is not None:
        check_branch(revision)
    if base_model is not None and not _HUB_MODEL.match(base_model):
        raise InputError(f"base model '{base_model}' is not a Hub id.", "Give it as ORG/NAME, or leave it out.")
    art = Artifact.open(artifact_path)
    with rep.step("checking the gate and the artifact's hashes"):
        files = check_publishable(art)
    card = render_card(art, repo_id, revision=revision, base_model=base_model, license=license, tags=tags, files=files)
    items = upload_list(art, files)
    items.append({"path": CARD_NAME, "size": len(card.encode()), "source": "generated model card"})
    notes: list[str] = []
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
        "notes": notes,
        "url": None,
        "commit_url": None,
        "commit_oid": None,
    }
    if dry_run:
        return result

    hf = _require_hub()
    api = _api()
    ev = art.manifest.evaluation or {}
    message = commit_message or (
        f"llmopt: {art.manifest.backend} ({art.manifest.format}), perplexity "
        f"{(ev.get('artifact') or {}).get('perplexity', float('nan')):.4f} "
        f"({ev.get('delta_pct', float('nan')):+.2f}% vs FP16), gate passed"
    )
    description = (
        f"Published by llmopt {__version__} after its gate passed.\n\n"
        f"Files digest (sha256 over the file table the evaluation saw): {files_digest(files)}"
    )
    with rep.step(f"creating {repo_id}" + (f" branch {revision}" if revision else "")):
        repo_url = _hub_call(
            f"create the repo {repo_id}",
            api.create_repo,
            repo_id,
            private=private,
            exist_ok=True,
            repo_type="model",
        )
        if revision:
            _hub_call(
                f"create the branch {revision} of {repo_id}",
                api.create_branch,
                repo_id,
                branch=revision,
                exist_ok=True,
            )
    operations = [
        hf.CommitOperationAdd(path_in_repo=i["path"], path_or_fileobj=str(art.path / i["path"]))
        for i in items
        if i["source"] in ("artifact", "manifest")
    ]
    operations.append(hf.CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.encode()))
    with rep.step(f"uploading {len(operations)} files ({_fmt_bytes(result['total_bytes'])}) in one commit"):
        info = _hub_call(
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
