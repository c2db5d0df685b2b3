"""Build the small local lm-eval task shipped for tests and docs: tests/data/britannica_cloze/.

A multiple-choice cloze made from real text, the Britannica eval text that scripts/prepare_assets.py prepares
(the 1911 Encyclopaedia Britannica article "Shakespeare"): each example is one sentence (or a clause a semicolon
or colon ends) with its last word removed; the choices are that word and 3 other words of the same text of its
kind (3+ letters; a capitalized word against capitalized ones, a lowercase word against lowercase ones), in a
seeded random order. At most --examples of them are kept (a seeded sample, in text order).
Deterministic: the same text and seed give the same file, byte for byte.

Usage: python scripts/build_cloze_task.py [--text FILE] [--out DIR] [--examples 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = Path.home() / ".cache" / "llmopt" / "assets" / "text" / "britannica-eval.txt"
DEFAULT_OUT = ROOT / "tests" / "data" / "britannica_cloze"
WORD = re.compile(r"^[A-Za-z][a-z]{2,}$")


def sentences(text: str) -> list[str]:
    """Sentences and the clauses a semicolon ends, each with its closing mark."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in re.split(r"(?<=[.!?;:])\s+", flat) if s.strip()]


def build(text: str, examples: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    # whole words only (no pieces of hyphenated words)
    vocab = sorted({w.strip(".,;:!?()'\"") for w in text.split()} - {""})
    vocab = [w for w in vocab if WORD.match(w)]
    # distractors of the answer's own kind: a name against names, a lowercase word against lowercase words
    kinds = {kind: [w for w in vocab if w[0].isupper() == kind] for kind in (True, False)}
    docs = []
    for sentence in sentences(text):
        words = sentence.split(" ")
        if not 6 <= len(words) <= 60 or not sentence.endswith((".", ";", ":")):
            continue
        last = words[-1][:-1]
        if not WORD.match(last):
            continue
        distractors = rng.sample([w for w in kinds[last[0].isupper()] if w != last], 3)
        choices = [last, *distractors]
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[:-1]), "choices": choices, "label": choices.index(last)})
    if len(docs) > examples:
        keep = sorted(rng.sample(range(len(docs)), examples))
        docs = [docs[i] for i in keep]
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = build(args.text.read_text(encoding="utf-8"), args.examples, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "britannica_cloze.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    print(f"{len(docs)} examples -> {data}")


if __name__ == "__main__":
    main()
