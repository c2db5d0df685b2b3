"""Does llama.cpp tokenize a converted GGUF like the source's Hugging Face tokenizer?

llmopt scores a GGUF on the baseline's token ids, so a GGUF whose own vocabulary is wrong still scores
well; but every llama.cpp tool that tokenizes text (llama-server, llama-cli, llama-imatrix,
llama-perplexity) would then fail or read the text differently. One way it happens: a byte-level BPE
tokenizer.json (ByteLevel pre-tokenizer) that says ``"byte_fallback": true`` and has a ``Sequence``
decoder, as some transformers versions write when they rebuild a tokenizer from a GGUF. The HF ids are
the same either way (a byte-level BPE never falls back to bytes), but llama.cpp's converter takes the
flag for a SentencePiece-style vocabulary and writes ``tokenizer.ggml.model = "llama"`` without merges;
llama.cpp then throws ``std::out_of_range`` (``unordered_map::at``) on the first space it tokenizes and
aborts the process.

So right after converting, the GGUF backend tokenizes a few texts with llama.cpp (vocabulary only, in
a child process: the abort must not take llmopt down and leave the staging folder behind) and with the
HF tokenizer (``add_special_tokens=False``), and stops with a ``ModelError`` naming the first
difference, the two vocabularies and the fix. The child is ``python .../gguf_vocab.py GGUF``:
texts as a JSON list on stdin, JSON lines on stdout (the vocabulary's metadata first, then one line of
ids and pieces per text), so a crash part-way still says which text it died on.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmopt.errors import ModelError

# The child runs this file as a script (``python .../gguf_vocab.py FILE.gguf``), which imports no llmopt
# package (a third of a second saved): llmopt is imported inside the parent's functions only.

# Fixed texts, checked for every model: prose, contractions, digits, punctuation, runs of spaces, tabs and
# newlines, accented Latin, Greek, Cyrillic, CJK, emoji (byte fallback in SentencePiece vocabularies).
SAMPLE_TEXTS = (
    "Hello world. The quick brown fox jumps over the lazy dog; it wasn't me, I'll say -- they'd agree!",
    "Shakespeare, William (1564--1616), English poet: 3.14159, 2,500 and 1234567890; version 0.3.36 (v2).",
    "  two  spaces,   three,\tone tab,\n\nblank line above;\n    indented code: x = [1, 2, 3]  # comment\n",
    "Quotes \"double\" and 'single', brackets {a: b} <tag/>, symbols @#$%^&*_+=|\\~` ... ?!",
    "Grüße aus München, ça va? Ñandú, Łódź, Ærøskøbing. Καλημέρα κόσμε. Привет, мир!",
    "東京は日本の首都です。北京欢迎你。서울에 갑니다. 🙂👍🏽 café ☕ x² ≤ ∞",
)
CALIBRATION_TEXTS = 8  # at most this many calibration samples are checked besides SAMPLE_TEXTS
CALIBRATION_CHARS = 4_000  # each cut to this many characters
# Share of calibration tokens that may differ (the sample texts may not differ at all): llama.cpp's pre-tokenizer
# code and the HF regex can split an odd spot differently; a broken vocabulary differs almost everywhere.
MAX_CALIBRATION_DIFFERING = 0.01

GGUF_VOCAB_KINDS = {
    "llama": "SentencePiece-style",
    "gpt2": "byte-level BPE",
    "bert": "WordPiece",
    "t5": "Unigram",
    "rwkv": "RWKV",
    "plamo2": "PLaMo-2",
    "gemma4": "Gemma 4",
}


# --- tokenizer.json --------------------------------------------------------------------------------------


def _types(node: Any) -> list[str]:
    """The component types of a tokenizer.json pre-tokenizer or decoder, a ``Sequence`` flattened."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("decoders") or []
        return [t for part in inner for t in _types(part)]
    return [str(node["type"])] if node.get("type") else []


def is_byte_level_bpe(tokenizer_json: dict[str, Any]) -> bool:
    """A BPE model under a ByteLevel pre-tokenizer: every byte is a token, so byte fallback never applies."""
    model = tokenizer_json.get("model") or {}
    return model.get("type") == "BPE" and "ByteLevel" in _types(tokenizer_json.get("pre_tokenizer"))


def without_byte_fallback(tokenizer_json: dict[str, Any]) -> dict[str, Any] | None:
    """A copy of a byte-level BPE tokenizer.json with ``"byte_fallback": false``; None when there is nothing
    to change (already false, or not a byte-level BPE). llama.cpp's converter reads ``true`` together with a
    ``Sequence`` decoder as a SentencePiece-style vocabulary and writes a GGUF that llama.cpp cannot tokenize
    with; the HF tokenizer gives the same ids either way (callers check that on real text)."""
    if not is_byte_level_bpe(tokenizer_json) or not tokenizer_json["model"].get("byte_fallback"):
        return None
    fixed = copy.deepcopy(tokenizer_json)
    fixed["model"]["byte_fallback"] = False
    return fixed


def describe_hf_tokenizer(folder: Path, tokenizer: Any) -> tuple[str, bool]:
    """What the HF tokenizer is, in words, and whether it is a byte-level BPE that says byte_fallback true."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{type(tokenizer).__name__} (no readable tokenizer.json)", False
    model = data.get("model") or {}
    byte_level = is_byte_level_bpe(data)
    parts = []
    pre = _types(data.get("pre_tokenizer"))
    if pre:
        parts.append(f"pre-tokenizer {'+'.join(pre)}")
    if "byte_fallback" in model:
        parts.append(f"byte_fallback {str(bool(model['byte_fallback'])).lower()}")
    decoder = data.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        parts.append(f"decoder Sequence({', '.join(_types(decoder))})")
    elif decoder.get("type"):
        parts.append(f"decoder {decoder['type']}")
    kind = "byte-level BPE" if byte_level else f"{model.get('type', 'unknown')} model"
    return f"{kind} ({', '.join(parts)})" if parts else kind, byte_level and bool(model.get("byte_fallback"))


# --- the check (parent) ------------------------------------------------------------------------------------


def calibration_texts(tokenizer: Any, calibration: Sequence[Sequence[int]] | None) -> list[str]:
    """The first CALIBRATION_TEXTS calibration samples decoded to text (special tokens left out), cut short."""
    texts = []
    for ids in list(calibration or [])[:CALIBRATION_TEXTS]:
        text = str(tokenizer.decode(list(ids), skip_special_tokens=True))[:CALIBRATION_CHARS]
        if text.strip():
            texts.append(text)
    return texts


def check_gguf_vocab(
    gguf_file: Path,
    source_dir: Path,
    *,
    trust_remote_code: bool = False,
    calibration: Sequence[Sequence[int]] | None = None,
    timeout: float = 300,
) -> dict[str, Any]:
    """Raise ModelError unless llama.cpp tokenizes ``gguf_file`` like the HF tokenizer of ``source_dir``.

    SAMPLE_TEXTS must give the same ids exactly. Calibration samples (when given) are real text, where
    llama.cpp's own pre-tokenizer code may split an odd spot differently from the HF tokenizer's regex
    (SmolLM2 as transformers rebuilds it from its GGUF: a run of newlines before a digit, about 1 token in
    900); there at most MAX_CALIBRATION_DIFFERING of the tokens may differ, and the count and the first
    difference are returned. A crash of llama.cpp on any text is a mismatch.

    Returns ``{"texts", "tokens", "seconds"}``, plus ``calibration_tokens_differing`` (and the first such
    difference, in words) when calibration samples were compared.
    """
    from llmopt.backends.gguf_toolchain import child_env
    from llmopt.errors import ModelError
    from llmopt.source import load_tokenizer

    start = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), str(gguf_file)]
    env = child_env(1)
    env.setdefault("GGML_NO_BACKTRACE", "1")  # on an abort ggml would run gdb for a backtrace: seconds, and noise
    # The child loads llama.cpp and the vocabulary while the HF tokenizer loads here.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        encoding="utf-8",
    )  # fmt: skip
    texts = list(SAMPLE_TEXTS)
    try:
        tokenizer = load_tokenizer(source_dir, trust_remote_code=trust_remote_code)
        texts += calibration_texts(tokenizer, calibration)
        stdout, stderr = proc.communicate(json.dumps(texts), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise ModelError(
            f"llama.cpp did not finish tokenizing {len(texts)} short texts with {gguf_file.name} in {timeout:.0f} s.",
            "Check the machine's load; the converted vocabulary may be broken (see docs/gguf.md).",
        ) from None
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        raise
    expected = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    answers = []
    for line in stdout.splitlines():
        try:
            answer = json.loads(line) if line.startswith("{") else None
        except ValueError:
            answer = None  # a line cut short by a crash: the texts after it count as unanswered
        if isinstance(answer, dict):
            answers.append(answer)
    if not answers and "could not load the vocabulary" in stderr:
        raise ModelError(
            f"llama.cpp could not load the vocabulary of the converted {gguf_file.name}.",
            "The converter wrote a GGUF this llama.cpp cannot read: check that llama-cpp-python and the converter "
            "come from the same build (`python scripts/build_llamacpp.py`; docs/gguf.md).",
        )
    verdict = compare(texts, expected, answers, proc.returncode, stderr, tokenizer.decode, strict=len(SAMPLE_TEXTS))
    if verdict.problem is not None:
        meta = answers[0].get("meta", {}) if answers else {}
        raise mismatch_error(verdict.problem, gguf_file, source_dir, tokenizer, meta)
    result: dict[str, Any] = {"texts": len(texts), "tokens": sum(len(e) for e in expected)}
    if len(texts) > len(SAMPLE_TEXTS):
        result["calibration_tokens_differing"] = verdict.differing
        if verdict.first_tolerated:
            result["first_calibration_difference"] = verdict.first_tolerated
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


@dataclass(frozen=True)
class Verdict:
    problem: str | None  # why the GGUF fails the check, in words; None: it passes
    differing: int = 0  # tokens that differ in the tolerant texts (those after the strict ones)
    compared: int = 0  # tokens compared in the tolerant texts
    first_tolerated: str | None = None  # the first difference there, in words


def compare(
    texts: list[str],
    expected: list[list[int]],
    answers: list[dict[str, Any]],
    returncode: int | None,
    stderr: str,
    decode: Callable[[list[int]], str],
    *,
    strict: int,
) -> Verdict:
    """llama.cpp's answers (the child's JSON lines) against the HF ids.

    The first ``strict`` texts must match exactly; in the others at most MAX_CALIBRATION_DIFFERING of the HF
    tokens may be unmatched (aligned with difflib). A child that died before answering for a text (llama.cpp
    aborts on some broken vocabularies) is a mismatch.
    """
    results = [a for a in answers if "ids" in a]
    differing = compared = 0
    first_tolerated: str | None = None
    for i, (text, want) in enumerate(zip(texts, expected, strict=True)):
        kind = "sample text" if i < strict else "calibration text"
        count = strict if i < strict else len(texts) - strict
        where = f"{kind} {i + 1 if i < strict else i + 1 - strict} of {count} ({_snippet(text, 0)})"
        if i >= len(results):
            how, detail = _death(returncode, stderr)
            return Verdict(f"llama.cpp {how} while tokenizing {where}" + (f": {detail}" if detail else ""))
        got, pieces = results[i]["ids"], results[i]["pieces"]
        if got == want:
            compared += len(want) if i >= strict else 0
            continue
        first = _first_difference(decode, text, want, got, pieces, where)
        if i < strict:
            return Verdict(first)
        matcher = difflib.SequenceMatcher(None, want, got, autojunk=False)
        # unmatched tokens on the longer side: llama.cpp splitting one HF token in two counts, as does merging two
        differing += max(len(want), len(got)) - sum(block.size for block in matcher.get_matching_blocks())
        compared += len(want)
        first_tolerated = first_tolerated or first
    if compared and differing > MAX_CALIBRATION_DIFFERING * compared:
        return Verdict(
            f"{differing:,} of {compared:,} calibration tokens differ (at most {MAX_CALIBRATION_DIFFERING:.0%} may); "
            f"first: {first_tolerated}",
            differing,
            compared,
            first_tolerated,
        )
    if returncode != 0:
        how, detail = _death(returncode, stderr)
        return Verdict(f"llama.cpp {how} after tokenizing every text" + (f": {detail}" if detail else ""))
    return Verdict(None, differing, compared, first_tolerated)


def _snippet(text: str, at: int, width: int = 40) -> str:
    lo = max(0, at - width // 2)
    cut = text[lo : lo + width]
    return ("…" if lo else "") + repr(cut) + ("…" if lo + width < len(text) else "")


def _death(returncode: int | None, stderr: str) -> tuple[str, str]:
    """How the child ended ('crashed (SIGABRT)', 'failed (exit 2)') and the lines of its stderr that say why."""
    from llmopt.backends.gguf_toolchain import log_tail

    if returncode is not None and returncode < 0:
        try:
            how = f"crashed ({signal.Signals(-returncode).name})"
        except ValueError:
            how = f"crashed (signal {-returncode})"
    else:
        how = f"failed (exit {returncode})"
    lines = [ln for ln in stderr.splitlines() if "terminate called" in ln or "what()" in ln or "error" in ln.lower()]
    detail = " ".join(ln.strip() for ln in lines[-3:]) if lines else log_tail(stderr, 2)
    return how, detail


def _first_difference(
    decode: Callable[[list[int]], str], text: str, want: list[int], got: list[int], pieces: list[str], where: str
) -> str:
    n = next((k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), min(len(want), len(got)))
    hf = f"{want[n]} {decode([want[n]])!r}" if n < len(want) else "(end of text)"
    cpp = f"{got[n]} {pieces[n]!r}" if n < len(got) else "(end of text)"
    # where in the text: the HF pieces before the difference, joined
    at = len(decode(want[:n])) if n else 0
    return (
        f"{where}: token {n} differs: HF tokenizer {hf}, llama.cpp {cpp} "
        f"(at {_snippet(text, at)}; {len(want)} vs {len(got)} tokens)"
    )


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
_STRING, _ARRAY = 8, 9


def read_gguf_vocab_meta(gguf_file: Path) -> dict[str, Any]:
    """``tokenizer.ggml.model`` and ``.pre`` (strings) and how many ``tokens`` and ``merges`` the file stores,
    read from the GGUF header alone (milliseconds; gguf-py's reader maps every array and tensor: seconds).
    Keys the file lacks are left out; a file that is no readable GGUF gives ``{}``."""
    import mmap
    import struct

    out: dict[str, Any] = {}
    try:
        with open(gguf_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] < 2:
                return {}
            (n_kv,) = struct.unpack_from("<Q", buf, 16)
            pos = 24

            def string() -> str:
                nonlocal pos
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
                return bytes(buf[pos - n : pos]).decode("utf-8", "replace")

            def skip(kind: int) -> None:
                nonlocal pos
                if kind == _STRING:
                    (n,) = struct.unpack_from("<Q", buf, pos)
                    pos += 8 + n
                elif kind in _SCALAR_SIZES:
                    pos += _SCALAR_SIZES[kind]
                else:
                    raise ValueError(f"GGUF value type {kind}")

            for _ in range(n_kv):
                key = string()
                (kind,) = struct.unpack_from("<I", buf, pos)
                pos += 4
                name = key.removeprefix("tokenizer.ggml.") if key.startswith("tokenizer.ggml.") else None
                if kind == _ARRAY:
                    item, count = struct.unpack_from("<IQ", buf, pos)
                    pos += 12
                    if name in ("tokens", "merges"):
                        out[name] = count
                    if item in _SCALAR_SIZES:
                        pos += _SCALAR_SIZES[item] * count
                    else:
                        for _ in range(count):
                            skip(item)
                elif kind == _STRING and name in ("model", "pre"):
                    out[name] = string()
                else:
                    skip(kind)
    except (OSError, ValueError, OverflowError, MemoryError, struct.error):
        return out
    return out


def mismatch_error(problem: str, gguf_file: Path, source_dir: Path, tokenizer: Any, meta: dict[str, Any]) -> ModelError:
    from llmopt.errors import ModelError

    read = read_gguf_vocab_meta(gguf_file)
    model = meta.get("model") or read.get("model")
    pre = meta.get("pre") or read.get("pre")
    vocab = f"tokenizer.ggml.model {model!r}" if model else "an unreadable vocabulary"
    if model in GGUF_VOCAB_KINDS:
        vocab += f" ({GGUF_VOCAB_KINDS[model]})"
    if pre:
        vocab += f", pre-tokenizer {pre!r}"
    if model:
        vocab += f", {read.get('merges', 0):,} merges" if read else ""
    hf, byte_level_fallback = describe_hf_tokenizer(source_dir, tokenizer)
    message = (
        f"llama.cpp does not tokenize the converted GGUF like the source model; llama.cpp's tools "
        f"(llama-server, llama-cli, llama-imatrix, llama-perplexity) could not use it.\n"
        f"    {problem}\n"
        f"    GGUF vocabulary: {vocab}\n"
        f"    HF tokenizer: {hf}"
    )
    if byte_level_fallback:
        hint = (
            f'Set "byte_fallback": false in the "model" section of {source_dir / "tokenizer.json"} (of a local copy, '
            "for a Hub model) and run again: "
            "a byte-level BPE never falls back to bytes, so the HF token ids stay the same, while true makes "
            "llama.cpp's converter write a SentencePiece-style vocabulary (docs/gguf.md)."
        )
    else:
        hint = (
            f"Check the tokenizer files in {source_dir} against the original model's; if they are right, "
            "llama.cpp's converter may not handle this tokenizer: try a newer llama-cpp-python "
            "(`python scripts/build_llamacpp.py --version X.Y.Z`)."
        )
    return ModelError(message, hint)


# --- the child ---------------------------------------------------------------------------------------------


def _child(gguf_file: str) -> None:
    """Load the vocabulary only, tokenize the texts on stdin; one JSON line of metadata, then one per text."""
    import ctypes

    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything llama.cpp prints goes to stderr, never into the answer
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(gguf_file.encode(), params)
    if not model:
        print(f"error: llama.cpp could not load the vocabulary of {gguf_file}", file=sys.stderr)
        raise SystemExit(2)
    vocab = llama_cpp.llama_model_get_vocab(model)

    def meta_str(key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    meta = {
        "model": meta_str("tokenizer.ggml.model"),
        "pre": meta_str("tokenizer.ggml.pre"),
        "vocab_type": int(llama_cpp.llama_vocab_type(vocab)),
        "n_tokens": int(llama_cpp.llama_vocab_n_tokens(vocab)),
    }
    proto.write(json.dumps({"meta": meta}) + "\n")
    proto.flush()
    texts = json.loads(sys.stdin.read())  # read only now: the parent loads its tokenizer meanwhile
    piece_buf = ctypes.create_string_buffer(256)
    for text in texts:
        data = text.encode("utf-8")
        cap = len(data) + 16
        tokens = (llama_cpp.llama_token * cap)()
        # add_special=False: no BOS/EOS; parse_special=True: special tokens in the text are matched whole, as
        # the HF tokenizer does
        n = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, cap, False, True)
        if n < 0:
            cap = -n
            tokens = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), tokens, cap, False, True)
        ids = [int(t) for t in tokens[:n]]
        pieces = []
        for t in ids:
            k = llama_cpp.llama_token_to_piece(vocab, t, piece_buf, len(piece_buf), 0, True)
            pieces.append(piece_buf.raw[: max(k, 0)].decode("utf-8", "replace"))
        proto.write(json.dumps({"ids": ids, "pieces": pieces}) + "\n")
        proto.flush()
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python llmopt/backends/gguf_vocab.py FILE.gguf  (texts as a JSON list on stdin)")
    _child(sys.argv[1])
