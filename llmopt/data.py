"""Calibration and evaluation text.

Text comes from a local file (``.txt``, ``.jsonl`` with a ``text`` field, ``.parquet`` with a ``text``
column) or, when the Hub is reachable, a named dataset (``wikitext2``, ``c4``) through ``datasets``.
Calibration samples are fixed-length slices of the tokenized text, picked deterministically, and
hashed so the manifest says exactly what the quantizer saw.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.artifact import sha256_json
from llmopt.errors import BackendUnavailableError, DataError

NAMED_DATASETS: dict[str, dict[str, Any]] = {
    "wikitext2": {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test", "calib_split": "train"},
    "c4": {
        "path": "allenai/c4",
        "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        "split": "validation",
        "calib_split": "validation",
    },
}


@dataclass
class CalibrationSet:
    samples: list[list[int]]
    dataset: str
    seq_len: int
    tokens_sha256: str
    text_sha256: str

    def manifest_record(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "samples": len(self.samples),
            "seq_len": self.seq_len,
            "tokens_sha256": self.tokens_sha256,
            "text_sha256": self.text_sha256,
        }


def load_text(spec: str, *, purpose: str = "evaluation") -> str:
    """Return the text behind a path or a dataset name, joined by blank lines."""
    path = Path(spec).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise DataError(f"{spec} is a folder with no .txt, .jsonl or .parquet files.", "Give a text file.")
        return "\n\n".join(_read_file(p) for p in files)
    if spec in NAMED_DATASETS:
        return _named(spec, purpose)
    raise DataError(
        f"{purpose} text '{spec}' is neither a file nor a known dataset.",
        f"Give a .txt/.jsonl/.parquet file, or one of: {', '.join(NAMED_DATASETS)} (needs the Hub).",
    )


def _read_file(path: Path) -> str:
    try:
        if path.suffix == ".jsonl":
            rows = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                if not isinstance(obj, dict) or "text" not in obj:
                    raise DataError(f"{path}:{i} has no 'text' field.", "Each JSONL line needs {\"text\": ...}.")
                rows.append(str(obj["text"]))
            return "\n\n".join(rows)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise DataError(f"{path} has no 'text' column (has: {', '.join(table.column_names)}).",
                                "Rename the text column to 'text'.")
            return "\n\n".join(str(t) for t in table.column("text").to_pylist())
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text.", "Convert it to UTF-8.") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc}).", "Fix the file: one JSON object per line.") from None
    except ImportError:
        raise BackendUnavailableError("reading .parquet needs pyarrow.", "pip install pyarrow") from None


def _named(name: str, purpose: str) -> str:
    try:
        import datasets
    except ImportError:
        raise BackendUnavailableError(
            f"dataset '{name}' needs the 'datasets' package and the Hugging Face Hub.",
            "pip install datasets, or give a local text file.",
        ) from None
    spec = dict(NAMED_DATASETS[name])
    split = spec.pop("calib_split") if purpose == "calibration" else spec["split"]
    spec.pop("split")
    try:
        ds = datasets.load_dataset(**spec, split=split)
    except Exception as exc:
        raise DataError(
            f"could not load dataset '{name}' from the Hub: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "Check the network (HF_DATASETS_OFFLINE must be unset), or give a local text file.",
        ) from None
    return "\n\n".join(t for t in ds["text"] if t)


# The shortest calibration sample: GPTQModel drops samples of 10 tokens or fewer and then divides by how many are
# left (a ZeroDivisionError when none are); 16 keeps every method clear of that.
MIN_SEQ_LEN = 16


def check_calibration_settings(samples: int, seq_len: int) -> None:
    """Refuse calibration sizes that cannot work, before the model or the text is read."""
    if samples < 1:
        raise DataError(f"--samples {samples} must be at least 1.", "Pass --samples 1 or more (default 128).")
    if seq_len < MIN_SEQ_LEN:
        raise DataError(
            f"--seq-len {seq_len} must be at least {MIN_SEQ_LEN} tokens.",
            f"Pass --seq-len {MIN_SEQ_LEN} or more (default 512; recipe: calibration.seq_len).",
        )


def calibration_size_hint(tokens: int, samples: int, seq_len: int) -> str:
    """What to change when ``tokens`` cannot give ``samples`` slices of ``seq_len``: only what would help, named as
    a flag (quantize) and as a recipe key (run)."""
    available = tokens // seq_len
    more = f"give a text of at least {samples * seq_len:,} tokens"
    if tokens < MIN_SEQ_LEN:  # nothing to slice: no setting helps
        return f"The text is empty or nearly ({tokens} tokens): {more}."
    if available >= 1:
        fewer = f"lower --samples (recipe: calibration.samples) to {available}"
    elif tokens // samples >= MIN_SEQ_LEN:
        fewer = f"lower --seq-len (recipe: calibration.seq_len) to {tokens // samples} or less"
    else:  # even the shortest slices are too few for that many samples: both must come down
        fewer = (
            f"lower --seq-len (recipe: calibration.seq_len) to {MIN_SEQ_LEN} and --samples (recipe: "
            f"calibration.samples) to {tokens // MIN_SEQ_LEN}"
        )
    return f"{fewer[0].upper()}{fewer[1:]}, or {more}."


def calibration_set(
    tokenizer: Any, spec: str, *, samples: int, seq_len: int, seed: int = 0
) -> CalibrationSet:
    """``samples`` distinct slices of ``seq_len`` tokens from the text, chosen with a fixed seed."""
    check_calibration_settings(samples, seq_len)
    text = load_text(spec, purpose="calibration")
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    available = len(ids) // seq_len
    if available < samples:
        raise DataError(
            f"calibration text '{spec}' has {len(ids):,} tokens: {available} samples of {seq_len} tokens, "
            f"{samples} asked.",
            calibration_size_hint(len(ids), samples, seq_len),
        )
    starts = sorted(random.Random(seed).sample(range(available), samples))
    chosen = [ids[s * seq_len : (s + 1) * seq_len] for s in starts]
    return CalibrationSet(
        samples=chosen,
        dataset=spec,
        seq_len=seq_len,
        tokens_sha256=sha256_json(chosen),
        text_sha256=hashlib.sha256(text.encode()).hexdigest(),
    )
