"""Downstream accuracy through lm-evaluation-harness (lm-eval 0.4.x), on models the runners already loaded.

``plan_tasks`` checks what ``--tasks`` names before any model is loaded: lm-eval installed (exit 4), every name a
task lm-eval knows (exit 2, with the close names), every local task file a valid lm-eval task YAML whose data
loads, under a name that is not one of lm-eval's own (exit 2). A local task is lm-eval's own YAML (``task:``,
``dataset_path: json``, ``dataset_kwargs.data_files`` ...); a relative data file is taken relative to the YAML's
folder, so a task folder can travel. Names of lm-eval's own tasks load their data from the Hugging Face Hub; where it
does not answer (one quick request), from the datasets cache alone, and data not cached there is exit 4.

``run_tasks`` scores one loaded transformers model (the runner's own ``nn.Module``, no second copy) on the plan's
tasks with ``lm_eval.evaluator.evaluate``, the same examples for every model (``limit`` takes the first N of each
task), and keeps each example's score (``log_samples``), so that ``compare`` can give the artifact's recovery
(artifact / baseline) with a paired standard error.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import glob
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt._thirdparty import third_party_logs_wanted
from llmopt.errors import BackendUnavailableError, DataError, InputError
from llmopt.results import TaskComparison, TaskScore, TasksReport

__all__ = ["TaskPlan", "compare", "lm_eval_version", "plan_tasks", "run_tasks"]

INSTALL_HINT = "Install lm-evaluation-harness: pip install 'llmopt[tasks]' (lm-eval 0.4.x)."
_YAML_SUFFIXES = (".yaml", ".yml")
# The metric a task's recovery (and the min_recovery gate) reads, where lm-eval gives several.
_PRIMARY = ("acc_norm", "acc", "exact_match")


def lm_eval_version() -> str:
    """The installed lm-eval's version; exit 4 with the install line when it is missing."""
    from importlib import metadata

    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f"--tasks needs lm-evaluation-harness ({exc}).", INSTALL_HINT) from None
    return metadata.version("lm_eval")


@dataclass
class TaskPlan:
    """The checked tasks of one evaluation: what was asked, how lm-eval loads it, what identifies it."""

    requested: list[str]
    specs: list[str | dict[str, Any]]  # names for lm-eval's TaskManager, or a local task's resolved config
    names: list[str]
    limit: int | None
    harness: str
    files_sha256: str | None  # of the local task files and their data (None: lm-eval's own tasks only)
    _manager: Any = field(default=None, repr=False)
    # The Hub did not answer when the plan was made: its tasks load from the datasets cache alone, in offline mode,
    # instead of each load retrying the Hub for ~25 s (and printing every retry).
    hub_offline: bool = False

    def identity(self) -> dict[str, Any]:
        """What makes two plans measure the same (a cache key's part)."""
        return {"tasks": self.names, "limit": self.limit, "harness": self.harness, "files": self.files_sha256}

    def load(self) -> dict[str, Any]:
        """Fresh lm-eval Task objects (lm-eval keeps each run's requests on them)."""
        with _quiet(), _hub_offline() if self.hub_offline else contextlib.nullcontext():
            return dict(self._manager.load(list(self.specs)))


def is_local_task(entry: str) -> bool:
    return entry.lower().endswith(_YAML_SUFFIXES)


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool) -> Any:
    """lm-eval's task index, built once per process: indexing its ~10,000 task files takes 10-30 s, and `llmopt
    run` plans the tasks before any work and again for each variant. Only built with the defaults when a task
    name (not a local file) asks for them."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager(include_defaults=include_defaults)


def plan_tasks(tasks: list[str], limit: int | None) -> TaskPlan:
    """Check ``tasks`` (lm-eval task names and local task YAML files) and load their examples once."""
    harness = f"lm-eval {lm_eval_version()}"
    specs: list[str | dict[str, Any]] = []
    names: list[str] = []
    digest = hashlib.sha256()
    local = False
    for entry in tasks:
        if is_local_task(entry):
            config, files = _local_task(Path(entry))
            for path in files:
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
            specs.append(config)
            names.append(str(config["task"]))
            local = True
        else:
            specs.append(entry)
            names.append(entry)
    needs_index = any(isinstance(s, str) for s in specs)
    manager = _task_manager(needs_index)
    _refuse_shadowing(tasks, specs, set(manager.all_tasks) if needs_index else _lm_eval_own_names())
    for spec in specs:
        if isinstance(spec, str) and spec not in manager.all_tasks:
            entry = spec
            close = difflib.get_close_matches(entry, manager.all_tasks, n=5, cutoff=0.6)
            raise InputError(
                f"lm-eval has no task '{entry}'" + (f"; close names: {', '.join(close)}." if close else "."),
                "See `lm-eval ls tasks` (or `python -m lm_eval --tasks list`) for the names, or pass a local task "
                "file (lm-eval's task YAML) as --tasks path/to/task.yaml.",
            )
    plan = TaskPlan(
        requested=list(tasks),
        specs=specs,
        names=names,
        limit=limit,
        harness=harness,
        files_sha256=digest.hexdigest() if local else None,
        _manager=manager,
        # lm-eval's own tasks read their data from the Hub: where it does not answer, from the cache alone
        hub_offline=needs_index and not _offline_mode_set() and not _hub_reachable(_hub_endpoint()),
    )
    loaded = _load_checked(plan)
    plan.names = sorted(loaded["tasks"])  # a group or tag name stands for its tasks
    return plan


# Top-level `task:`, `group:` and `tag:` lines of lm-eval's task YAML files: one name, an inline list, or a block list.
_NAME_KEY = re.compile(
    r"""^["']?(?:task|group|tag)["']?:[ \t]*(?P<inline>[^\n#]*)(?P<block>(?:\n[ \t]+-[^\n]*)*)""", re.M
)


@functools.lru_cache(maxsize=1)
def _lm_eval_own_names() -> frozenset[str]:
    """The names of lm-eval's own tasks, groups and tags, read from its task YAML files (~2 s for ~14,000 files; its
    full index takes 10-30 s and is built only when a task name asks for it). A few names made by Python code are
    not in those files: such a shadow goes unnoticed unless a task name also asked for the index."""
    import lm_eval.tasks

    names: set[str] = set()
    # templates that tasks `include:` (their tags become the tasks') are often named like `_default_template_yaml`
    for path in Path(lm_eval.tasks.__file__).parent.rglob("*y*ml*"):
        if path.suffix in (".py", ".md", ".json") or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for m in _NAME_KEY.finditer(text):
            block = [line.strip()[1:].split("#")[0] for line in m["block"].splitlines() if line.strip()]
            items = m["inline"].strip().strip("[]").split(",") + [b for b in block if ":" not in b]
            names.update(v.strip().strip("'\"") for v in items)
    return frozenset(names - {"", "null"})


def _refuse_shadowing(requested: list[str], specs: list[str | dict[str, Any]], own: set[str] | frozenset[str]) -> None:
    """A local task file under the name of one of lm-eval's own tasks (or of another requested task) is refused:
    reports, the baseline cache and model cards name a task's scores by its name alone, so the local task would be
    reported (and published) as lm-eval's benchmark of that name, or one of the two would silently replace the
    other in the results."""
    seen: dict[str, str] = {entry: entry for entry, spec in zip(requested, specs, strict=True) if isinstance(spec, str)}
    for entry, spec in zip(requested, specs, strict=True):
        if isinstance(spec, str):
            continue
        name = str(spec["task"])
        if name in own or name in seen:
            other = f"lm-eval's own task (or group) '{name}'" if name in own else f"the task of --tasks {seen[name]}"
            raise InputError(
                f"--tasks {entry}: its task name '{name}' is also {other}; refused, because reports and model "
                "cards name a task's scores by its name alone, so the two could not be told apart.",
                f"Rename the task in the YAML (e.g. `task: {name}_local`)"
                + (f", or pass the name {name} to run lm-eval's own." if name in own else "."),
            )
        seen[name] = entry


def _local_task(path: Path) -> tuple[dict[str, Any], list[Path]]:
    """A local task YAML as lm-eval reads it, its data files made absolute; and the files it is made of."""
    if not path.is_file():
        raise InputError(
            f"--tasks {path}: no such task file.", "Give an lm-eval task name or the path of a task YAML file."
        )
    try:
        config = _read_task_yaml(path)
    except Exception as exc:  # YAML syntax, a bad !function, an include that is missing: all bad input
        raise DataError(
            f"--tasks {path} is not a valid lm-eval task file: {_first_line(exc)}.",
            "Fix the YAML (see lm-eval's docs/task_guide.md; tests/data/britannica_cloze/ is an example).",
        ) from None
    if not isinstance(config.get("task"), str) or not config["task"]:
        raise DataError(
            f"--tasks {path} has no 'task:' name (a local file holds one lm-eval task).",
            "Add `task: NAME` to the YAML (see tests/data/britannica_cloze/britannica_cloze.yaml).",
        )
    files = [path.resolve()]
    given = config.get("dataset_kwargs")
    kwargs: dict[str, Any] = given if isinstance(given, dict) else {}
    data_files = kwargs.get("data_files")
    if data_files is not None:
        resolved = _resolve_data_files(data_files, path.resolve().parent, path, _template_fields(config))
        # datasets reads data_files as glob patterns: a folder named like `tasks [v2]` matched nothing
        # ("StopIteration"), and one named `run*` could match other folders' files too. These are exact files: escaped.
        config["dataset_kwargs"] = {**kwargs, "data_files": _map_paths(resolved, glob.escape)}
        for value in resolved.values() if isinstance(resolved, dict) else [resolved]:
            files += [Path(v) for v in (value if isinstance(value, list) else [value])]
    return config, files


def _map_paths(data_files: Any, fn: Any) -> Any:
    """``fn`` applied to every path of a resolved ``data_files`` (a path, a list, or a mapping of split -> either)."""
    if isinstance(data_files, dict):
        return {k: _map_paths(v, fn) for k, v in data_files.items()}
    if isinstance(data_files, list):
        return [fn(v) for v in data_files]
    return fn(data_files)


def _unescape_glob(pattern: str) -> str:
    return re.sub(r"\[([*?\[])\]", r"\1", pattern)


def _read_task_yaml(path: Path) -> dict[str, Any]:
    """The task YAML as lm-eval reads it (``!function`` tags, ``include:``). lm-eval 0.4 has no public loader for
    one file; its own (``lm_eval.tasks._yaml_loader``) is used where it is, else plain YAML (then a task file
    that uses ``!function`` is refused as not valid, and says so)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # another lm-eval layout
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"expected a YAML mapping, got {type(data).__name__}") from None
        return data
    return dict(load_yaml(path, resolve_func=True))


def _template_fields(config: dict[str, Any]) -> frozenset[str]:
    """The names the task's prompt, choices and answer templates read (a plain field name, or a Jinja template's
    variables); none when a ``process_docs`` function makes the examples (it may make those fields itself)."""
    if config.get("process_docs") is not None:
        return frozenset()
    import jinja2
    import jinja2.meta

    names: set[str] = set()
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        template = config.get(key)
        if not isinstance(template, str):
            continue
        if "{{" in template or "{%" in template:
            with contextlib.suppress(jinja2.TemplateError):
                names |= jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
        else:
            names.add(template.strip())
    return frozenset(names)


def _resolve_data_files(data_files: Any, folder: Path, task_file: Path, fields: frozenset[str] = frozenset()) -> Any:
    def one(value: Any) -> str:
        if not isinstance(value, str):
            raise DataError(
                f"--tasks {task_file}: dataset_kwargs.data_files holds {value!r}, not a file path.",
                "Write the data file's path (relative to the YAML's folder) as a string.",
            )
        full = (folder / value).resolve()
        if not full.is_file():
            raise DataError(
                f"--tasks {task_file}: its data file {value} is not there ({full}).",
                "Put the data file next to the YAML, or fix dataset_kwargs.data_files.",
            )
        _check_data_file(full, task_file, fields)
        return str(full)

    if isinstance(data_files, dict):
        return {k: [one(v) for v in vs] if isinstance(vs, list) else one(vs) for k, vs in data_files.items()}
    if isinstance(data_files, list):
        return [one(v) for v in data_files]
    return one(data_files)


def _check_data_file(path: Path, task_file: Path, fields: frozenset[str] = frozenset()) -> None:
    """A data file that is empty, or a JSON-lines file with a line that is not a JSON object, named with its line:
    lm-eval's own messages for them ("StopIteration", "An error occurred while generating the dataset") name
    neither the file nor the line. And a line without a field the templates read (``fields``) that other lines
    have: datasets fills it with None, and the prompt reads "Question: None", silently."""
    hint = "Fix or rebuild the data file (each line one JSON object with the fields the YAML names); see docs/tasks.md."
    try:
        # utf-8-sig: a byte-order mark (a file saved by some Windows editors) loads in lm-eval, so here too
        text = path.read_text(encoding="utf-8-sig") if path.suffix.lower() == ".jsonl" else None
        empty = not text.strip() if text is not None else path.stat().st_size == 0
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"--tasks {task_file}: its data file {path} cannot be read ({_first_line(exc)}).", hint
        ) from None
    if empty:
        raise DataError(f"--tasks {task_file}: its data file {path} is empty (no examples).", hint)
    if text is None:
        return
    records: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if _json_array_of_objects(text):  # datasets' json loader falls back to one JSON array for the file
                return
            raise DataError(
                f"--tasks {task_file}: line {number} of its data file {path} is not valid JSON ({_first_line(exc)}).",
                hint,
            ) from None
        if not isinstance(record, dict):
            if _json_array_of_objects(text):
                return
            raise DataError(
                f"--tasks {task_file}: line {number} of its data file {path} is a JSON {type(record).__name__}, "
                "not an object.",
                hint,
            )
        records.append((number, record))
    columns = set().union(*(r.keys() for _, r in records))
    needed = sorted(fields & columns)
    for number, record in records:
        missing = [f for f in needed if f not in record]
        if missing:
            raise DataError(
                f"--tasks {task_file}: line {number} of its data file {path} has no {missing[0]!r}, which the task's "
                f"templates read (other lines have it); the example would read it as None.",
                hint,
            )


def _json_array_of_objects(text: str) -> bool:
    try:
        whole = json.loads(text)
    except ValueError:
        return False
    return isinstance(whole, list) and bool(whole) and all(isinstance(r, dict) for r in whole)


def _offline_mode_set() -> bool:
    """Whether the user turned the Hub off (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_DATASETS_OFFLINE)."""
    try:
        import datasets.config
        import huggingface_hub.constants
    except ImportError:
        return False
    return bool(huggingface_hub.constants.is_offline_mode() or datasets.config.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    try:
        import huggingface_hub.constants

        return str(huggingface_hub.constants.ENDPOINT)
    except ImportError:
        return "https://huggingface.co"


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """One quick request to the Hub (once per process): any HTTP answer, even an error status, means it is there;
    no connection (refused, no route, no DNS, timeout) means it is not."""
    import urllib.error
    import urllib.request

    try:
        request = urllib.request.Request(endpoint.rstrip("/") + "/api/status", method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # URLError, socket timeouts and resets are OSErrors; ValueError: a malformed URL
        return False
    return True


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode for a while (they read the switch at import, so their module
    constants are set, and put back after): a dataset in the cache loads, any other fails at once, no retries."""
    import datasets.config
    import huggingface_hub.constants

    saved = (
        huggingface_hub.constants.HF_HUB_OFFLINE,
        datasets.config.HF_HUB_OFFLINE,
        datasets.config.HF_DATASETS_OFFLINE,
    )
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        (
            huggingface_hub.constants.HF_HUB_OFFLINE,
            datasets.config.HF_HUB_OFFLINE,
            datasets.config.HF_DATASETS_OFFLINE,
        ) = saved


def _load_checked(plan: TaskPlan) -> dict[str, Any]:
    """Build the tasks once (reads their examples): a task lm-eval cannot build is bad input, before any model."""
    try:
        loaded = plan.load()
    except Exception as exc:
        where = ", ".join(plan.requested)
        text = str(exc).lower()
        from_hub = any(isinstance(s, str) for s in plan.specs) and (
            isinstance(exc, ConnectionError) or any(w in text for w in ("connect", "offline", "hub", "not cached"))
        )
        if from_hub and plan.hub_offline:  # the Hub did not answer (exit 4, as publish's "could not reach the Hub")
            raise BackendUnavailableError(
                f"--tasks {where}: the Hugging Face Hub ({_hub_endpoint()}) did not answer, and the task's data is "
                f"not in the datasets cache ({type(exc).__name__}: {_first_line(exc)}).",
                "Check the network (and HF_ENDPOINT if set) and run again, or use a local task file (lm-eval's YAML "
                "+ a local data file, see docs/tasks.md).",
            ) from None
        if from_hub and _offline_mode_set():  # the user turned the Hub off (exit 2, as publish in offline mode)
            raise DataError(
                f"--tasks {where}: the Hub is off here (offline mode: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE or "
                f"TRANSFORMERS_OFFLINE is set) and the task's data is not in the datasets cache "
                f"({type(exc).__name__}: {_first_line(exc)}).",
                "Unset them where the Hub is reachable, or use a local task file (lm-eval's YAML + a local data "
                "file, see docs/tasks.md).",
            ) from None
        raise DataError(
            f"--tasks {where}: lm-eval could not build the task(s) ({type(exc).__name__}: {_first_line(exc)}).",
            (
                "The Hugging Face Hub is not reachable for the task's dataset: use a local task file "
                "(lm-eval's YAML + a local data file, see docs/tasks.md)."
                if from_hub
                else "Check the task YAML and its data file (each line a JSON object with the fields the YAML "
                "names); see docs/tasks.md."
            ),
        ) from None
    for name, task in loaded["tasks"].items():
        try:
            count = len(task.eval_docs)
        except Exception as exc:
            raise DataError(
                f"--tasks: the examples of task '{name}' cannot be read ({_first_line(exc)}).",
                "Check its data file; see docs/tasks.md.",
            ) from None
        if count == 0:
            raise DataError(f"--tasks: task '{name}' has no examples.", "Check its data file and test_split.")
        # A local task's data is the user's (hand-edited, rebuilt): every example the run scores is checked, since
        # a bad one further down stops lm-eval mid-evaluation with a traceback, or scores 0 silently. lm-eval's own
        # tasks: their first examples (their data is lm-eval's, and some have tens of thousands).
        local = _local_data_files(plan, name)
        scored = count if plan.limit is None else min(count, plan.limit)
        key = (name, plan.files_sha256, scored)  # `llmopt run` plans again for each variant: the same files
        if local is None or key not in _CHECKED_LOCAL:
            _check_targets(name, task, scored if local is not None else min(3, count), local)
            if local is not None:
                _CHECKED_LOCAL.add(key)
    return loaded


# Local tasks whose every scored example passed _check_targets: (task name, sha256 of the plan's files, examples).
_CHECKED_LOCAL: set[tuple[str, str | None, int]] = set()


def _local_data_files(plan: TaskPlan, name: str) -> str | None:
    """The data file(s) of the plan's local task ``name`` (None: not a local task)."""
    for spec in plan.specs:
        if isinstance(spec, dict) and spec.get("task") == name:
            kwargs = spec.get("dataset_kwargs")
            files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
            flat = [
                _unescape_glob(str(v))
                for vs in (files.values() if isinstance(files, dict) else [files] if files is not None else [])
                for v in (vs if isinstance(vs, list) else [vs])
            ]
            return ", ".join(flat) or str(spec.get("dataset_path", ""))
    return None


def _check_targets(name: str, task: Any, n: int = 3, data: str | None = None) -> None:
    """A multiple-choice task whose answer is not one of its choices scores 0 for every model, silently (a
    `doc_to_target` naming a field the data lacks reads as a literal text); an example whose prompt, choices or
    answer lm-eval cannot render stops the evaluation with a traceback: refused on its first ``n`` examples."""
    config = getattr(task, "config", None)
    if getattr(config, "output_type", None) != "multiple_choice":
        return
    docs = task.eval_docs
    where = f" of {data}" if data else ""
    for i in range(min(n, len(docs))):
        try:
            doc = docs[i]
            task.doc_to_text(doc)
            choices = list(task.doc_to_choice(doc))
            target = task.doc_to_target(doc)
        except Exception as exc:
            raise DataError(
                f"--tasks: task '{name}' cannot read example {i + 1}{where} "
                f"({type(exc).__name__}: {_first_line(exc)}).",
                "Check that doc_to_text, doc_to_choice and doc_to_target name fields of its data, and that example's "
                "values; see docs/tasks.md.",
            ) from None
        if isinstance(target, list):
            continue  # several right answers: lm-eval's own rules
        ok = (
            0 <= target < len(choices)
            if isinstance(target, int) and not isinstance(target, bool)
            else isinstance(target, str) and target in choices
        )
        if not ok:
            field = getattr(config, "doc_to_target", None)
            raise DataError(
                f"--tasks: task '{name}': the answer of example {i + 1}{where} is {target!r}, which is not one of "
                f"its {len(choices)} choices (doc_to_target: {field!r}); every model would score 0 on it.",
                "Make doc_to_target name the field holding the answer's index (or its text); see docs/tasks.md.",
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval's INFO lines, warnings and progress bars (and datasets' bars, the Hub client's retries) off, unless
    logs are wanted."""
    if third_party_logs_wanted():
        yield
        return
    names = ("lm_eval", "lm-eval", "datasets", "evaluate", "huggingface_hub")  # the Hub client's "Retrying in 1s"
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_tasks(
    model: Any, tokenizer_path: Path, plan: TaskPlan, batch_size: int = 1, *, trust_remote_code: bool = False
) -> TasksReport:
    """Accuracy of a loaded transformers model on the plan's tasks (each example's score kept)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    from llmopt.source import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    start = time.perf_counter()
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluate(lm, plan.load(), limit=plan.limit, log_samples=True, bootstrap_iters=1000)
    assert out is not None  # one process: rank 0
    scores = [s for task in sorted(out["results"]) for s in _scores(task, out)]
    return TasksReport(
        requested=plan.requested,
        limit=plan.limit,
        harness=plan.harness,
        files_sha256=plan.files_sha256,
        scores=scores,
        seconds=round(time.perf_counter() - start, 3),
    )


def _scores(task: str, out: dict[str, Any]) -> list[TaskScore]:
    results = out["results"][task]
    samples = out.get("samples", {}).get(task) or []
    higher = out.get("higher_is_better", {}).get(task, {})
    config = out.get("configs", {}).get(task, {})
    scores = []
    for key, value in results.items():
        if "," not in key or "_stderr," in key or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        stderr = results.get(f"{metric}_stderr,{filt}")
        per = sorted((int(s["doc_id"]), s[metric]) for s in samples if s.get("filter") == filt and metric in s)
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for _, v in per) or all(
            isinstance(v, bool) for _, v in per
        )
        scores.append(
            TaskScore(
                task=task,
                metric=metric if filt == "none" else key,
                value=float(value),
                stderr=float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr) else None,
                n=len(per) or int(out.get("n-samples", {}).get(task, {}).get("effective", 0)),
                higher_is_better=higher.get(metric),
                dataset=config.get("dataset_path"),
                dataset_config=config.get("dataset_name"),
                doc_ids=[d for d, _ in per] if per and numeric else None,
                examples=[float(v) for _, v in per] if per and numeric else None,
            )
        )
    return scores


def primary_metric(scores: list[TaskScore], task: str) -> TaskScore | None:
    """The score a task's recovery is read from: acc_norm, else acc, else exact_match, else its first metric."""
    mine = [s for s in scores if s.task == task]
    for name in _PRIMARY:
        for s in mine:
            if s.metric == name:
                return s
    return mine[0] if mine else None


def recovery(artifact: list[float], baseline: list[float]) -> tuple[float | None, float | None]:
    """Recovery mean(artifact) / mean(baseline) over the same examples, with its paired (delta-method) error:
    se = sqrt(sum (a_i - R b_i)^2 / (n (n - 1))) / mean(b). A model against itself gives 1 and 0."""
    n = len(artifact)
    if n != len(baseline) or n == 0:
        return None, None
    mean_b = math.fsum(baseline) / n
    if mean_b == 0:
        return None, None
    ratio = math.fsum(artifact) / n / mean_b
    if n < 2:
        return ratio, None
    resid = math.fsum((a - ratio * b) ** 2 for a, b in zip(artifact, baseline, strict=True))
    return ratio, math.sqrt(resid / (n * (n - 1))) / abs(mean_b)


def compare(baseline: TasksReport, artifact: TasksReport) -> list[TaskComparison]:
    """Each metric both models have, artifact against baseline on the same examples."""
    out = []
    for a in artifact.scores:
        b = next((s for s in baseline.scores if s.task == a.task and s.metric == a.metric), None)
        if b is None:
            continue
        if a.examples is not None and b.examples is not None and a.doc_ids == b.doc_ids:
            rec, se = recovery(a.examples, b.examples)
        else:  # no per-example values (a corpus-level metric): the ratio alone
            rec, se = (a.value / b.value if b.value else None), None
        out.append(
            TaskComparison(
                task=a.task,
                metric=a.metric,
                baseline=b.value,
                baseline_stderr=b.stderr,
                artifact=a.value,
                artifact_stderr=a.stderr,
                recovery=rec,
                recovery_stderr=se,
                n=a.n,
                primary=primary_metric(artifact.scores, a.task) is a,
            )
        )
    return out
