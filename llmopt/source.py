"""Model sources: a local Hugging Face folder, a ``.gguf`` file, or a Hub id.

Everything here is checked cheaply (config present, weight headers readable and complete) so a bad
path fails in a second, before any library loads the model.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmopt.artifact import sha256_file
from llmopt.errors import BackendUnavailableError, ModelError

# A Hugging Face Hub model id (owner/name), as opposed to a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


# (resolved path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) -> sha256 of a source weight file hashed by
# this process. Only source provenance uses it; an artifact's integrity check (Artifact.verify) always reads every byte.
_SOURCE_HASHES: dict[tuple[str, int, int, int, int, int], str] = {}


def _source_file_sha256(path: Path) -> str:
    def key() -> tuple[str, int, int, int, int, int]:
        st = path.stat()
        # ctime too: writing the file or setting its mtime back (touch -d) changes it, and nobody can set it
        return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    before = key()
    known = _SOURCE_HASHES.get(before)
    if known is not None:
        return known
    digest = sha256_file(path)
    if key() == before:  # not changed while it was read
        _SOURCE_HASHES[before] = digest
    return digest


@dataclass
class SourceModel:
    """A model folder ready for transformers, and what we know about it."""

    spec: str  # what the user gave
    path: Path  # a local Hugging Face folder
    config: dict[str, Any]
    revision: str | None = None
    weight_files: list[Path] = field(default_factory=list)
    # The user allowed the folder's own Python code (auto_map) to run; every loader is told so explicitly.
    trust_remote_code: bool = False
    _weights_sha256: dict[str, str] | None = None

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def weights_sha256(self) -> dict[str, str]:
        """sha256 of each weight file, for the manifest's provenance record. A run resolves its source once per
        variant: a file this process already hashed, unchanged since (same device, inode, size, mtime and ctime), is
        not read again (an 8B model's 16 GB took ~13 s a variant)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = {p.name: _source_file_sha256(p) for p in self.weight_files}
        return self._weights_sha256

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)


def cache_dir() -> Path:
    """Where llmopt keeps converted sources and FP16 baselines (``LLMOPT_CACHE`` overrides)."""
    env = os.environ.get("LLMOPT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmopt"


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header (tensor names, dtypes, shapes, offsets) and its length in bytes;
    ValueError if malformed."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("file is shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise ValueError(f"header length {n} is larger than the file")
        header = json.loads(f.read(n))
    return header, n


def check_safetensors(path: Path) -> None:
    """Raise ModelError if a safetensors file is unreadable or shorter than its header says."""
    size = path.stat().st_size
    try:
        header, n = safetensors_header(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{path} is not a readable safetensors file ({exc}).",
            "The download or copy is corrupt: fetch the model again.",
        ) from None
    end = 0
    for name, begin, stop, shape, dtype in _header_entries(path, header):
        count = 1
        for d in shape:
            count *= d
        width = _DTYPE_BYTES.get(dtype, 0)
        if width and stop - begin != count * width:
            raise ModelError(
                f"{path}: tensor '{name}' has {stop - begin} bytes for shape {shape}.",
                "The file is corrupt: fetch the model again.",
            )
        end = max(end, stop)
    expected = 8 + n + end
    if size < expected:
        raise ModelError(
            f"{path} is truncated: its header describes {expected:,} bytes but the file has {size:,}.",
            "The download or copy did not finish: fetch the model again.",
        )


_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def remote_code(folder: Path) -> list[str]:
    """The ``auto_map`` entries of a model folder's configs: Python code transformers would import from it.

    Without an explicit ``trust_remote_code`` transformers decides by asking on stdin ("[y/N]"), so a piped
    ``yes`` or a stray "y" would run that code: llmopt refuses such a folder unless the user opted in.
    """
    found: list[str] = []
    for name in _CODE_CONFIGS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not auto_map:
            continue
        items = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
        for value in items:
            for ref in value if isinstance(value, list | tuple) else [value]:
                if isinstance(ref, str) and ref not in found:
                    found.append(ref)
    return found


def check_remote_code(folder: Path, trust_remote_code: bool, *, what: str = "model folder") -> None:
    """Refuse (exit 2) a folder that declares its own Python code, unless ``trust_remote_code``."""
    refs = remote_code(folder)
    if refs and not trust_remote_code:
        modules = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})
        raise ModelError(
            f"the {what} {folder} declares its own Python code (auto_map: {', '.join(refs[:4])}), which "
            "loading it would run; llmopt does not run a model's code unless asked.",
            f"Read {', '.join(modules[:4])} first; if you trust it, pass --trust-remote-code "
            "(recipe: model.trust_remote_code: true).",
        )


def _header_entries(path: Path, header: Any) -> list[tuple[str, int, int, list[int], str]]:
    """(name, begin, end, shape, dtype) of every tensor; ModelError for a header of the wrong shape.

    The header is JSON anyone can write: a list, a string entry or a shape of strings must be a clear refusal,
    not a traceback from the arithmetic below.
    """

    def bad(why: str) -> ModelError:
        return ModelError(
            f"{path} is not a valid safetensors file: {why}.", "The file is corrupt or not safetensors: fetch it again."
        )

    if not isinstance(header, dict):
        raise bad(f"its header is a JSON {type(header).__name__}, not an object")
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise bad(f"the entry of tensor '{name}' is a {type(meta).__name__}, not an object")
        offsets, shape, dtype = meta.get("data_offsets"), meta.get("shape"), meta.get("dtype")
        if not isinstance(dtype, str):
            raise bad(f"tensor '{name}' has no dtype")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"tensor '{name}' has shape {shape!r}, not a list of non-negative integers")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
        entries.append((str(name), offsets[0], offsets[1], shape, dtype))
    return entries


def check_pickle_weights(path: Path) -> None:
    """Refuse a ``.bin`` checkpoint that torch's safe loader (``weights_only``) would refuse.

    A pickle can name any Python callable; torch (and transformers) load checkpoints with ``weights_only=True``,
    which refuses such files mid-load with a traceback. Checked here first, memory-mapped (tensor data is not
    read), so the user gets one clear line.
    """
    try:
        import pickle

        import torch
    except ImportError:
        return  # nothing can load it here anyway; the backend check says what is missing
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # the legacy (non-zip) format cannot be memory-mapped
                raise
            torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise ModelError(
            f"{path} is a pickle that torch's safe loader refuses (it names Python code, not only tensors"
            + (f": {detail.strip()}" if detail else "")
            + "); llmopt does not unpickle it.",
            "Use the model's .safetensors weights, or convert this checkpoint to safetensors where you trust it.",
        ) from None
    except Exception as exc:
        raise ModelError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {(str(exc) or '?').splitlines()[0]}).",
            "The download or copy is corrupt: fetch the model again.",
        ) from None


def check_architecture(folder: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """A model_type this transformers does not know (and no trusted auto_map) is refused before loading."""
    if trust_remote_code and remote_code(folder):
        return
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    import difflib

    close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1)
    arch = (config.get("architectures") or [None])[0]
    what = f"model_type '{model_type}'" if model_type else "no model_type"
    raise ModelError(
        f"{folder}/config.json has {what}"
        + (f" (architecture {arch})" if arch else "")
        + ", which this version of transformers does not know.",
        (f"Did you mean '{close[0]}'? " if close else "")
        + "Fix config.json's model_type, upgrade transformers, or pick a model with a supported architecture.",
    )


def _load_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder.",
            "Give a folder saved with `save_pretrained`, a .gguf file, or a Hub id like org/name.",
        )
    try:
        data = json.loads(cfg.read_text())
    except ValueError as exc:
        raise ModelError(f"{cfg} is not valid JSON ({exc}).", "Fix or re-download config.json.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{cfg} does not hold a JSON object.", "Fix or re-download config.json.")
    return data


def open_folder(
    folder: Path, spec: str | None = None, revision: str | None = None, *, trust_remote_code: bool = False
) -> SourceModel:
    config = _load_config(folder)
    check_remote_code(folder, trust_remote_code)
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise ModelError(
            f"{folder} has a config.json but no weights (*.safetensors or *.bin).",
            "Copy the weight files next to config.json, or re-download the model.",
        )
    for p in weights:
        if p.suffix == ".safetensors":
            check_safetensors(p)
    if not any(p.suffix == ".safetensors" for p in weights):
        # transformers reads .bin only when no safetensors is present; then each must unpickle safely
        for p in weights:
            check_pickle_weights(p)
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise ModelError(
            f"{folder} holds a {archs[0]}, not a causal language model.",
            "llmopt quantizes causal LMs (…ForCausalLM); give such a model.",
        )
    check_architecture(folder, config, trust_remote_code)
    return SourceModel(
        spec=spec or str(folder),
        path=folder,
        config=config,
        revision=revision,
        weight_files=weights,
        trust_remote_code=trust_remote_code,
    )


# Files a folder's tokenizer can be loaded from (transformers' fast and slow tokenizers).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model", "spiece.model")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False, what: str = "model folder") -> Any:
    """The folder's tokenizer, or a ModelError (exit 2) that names what is missing and what to do.

    Checked before any work: llmopt scores every artifact on its baseline's token ids and stores the
    tokenizer in each artifact, so a folder without one cannot be quantized or evaluated.
    """
    if folder.is_dir() and not has_tokenizer(folder):
        raise ModelError(
            f"the {what} {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...).",
            "Copy the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) from the "
            "model it was made from into the folder, then run the command again.",
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"the tokenizer of the {what} {folder} cannot be loaded: {first}",
            "Check its tokenizer files (tokenizer.json, tokenizer_config.json) against the original model's.",
        ) from exc


def check_gguf_magic(path: Path) -> None:
    """A ``.gguf`` name is not a GGUF file: its first four bytes must be ``GGUF``, checked before any library."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"{path} cannot be read ({exc.strerror}).", "Check the file's permissions.") from None
    if magic != b"GGUF":
        seen = f"starts with {magic!r}" if magic else "is empty"
        raise ModelError(
            f"{path} is not a GGUF file: it {seen}, not the GGUF magic b'GGUF'.",
            "Give a .gguf file written by llama.cpp (the download or copy may be incomplete), "
            "or a Hugging Face model folder.",
        )


def gguf_to_folder(gguf_file: Path) -> Path:
    """Dequantize a .gguf file into a plain fp16 Hugging Face folder (cached by the file's hash)."""
    digest = sha256_file(gguf_file)
    out = cache_dir() / "gguf-sources" / digest[:16]
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    dequantize_gguf(gguf_file, out)
    return out


def dequantize_gguf(gguf_file: Path, out: Path) -> None:
    """Write ``gguf_file`` as an fp16 safetensors folder at ``out``, atomically (temp folder + rename)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise BackendUnavailableError(
            "reading a .gguf source needs torch, transformers, gguf and accelerate.",
            "pip install 'llmopt[core]'",
        ) from None
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
            )
        except Exception as exc:
            raise ModelError(
                f"transformers could not read {gguf_file}: {type(exc).__name__}: {exc}",
                "Check that the GGUF's architecture is one transformers can dequantize.",
            ) from None
        # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        from llmopt.atomic import give_plain_folder

        give_plain_folder(tmp)  # mkdtemp made it 0700, transformers' safetensors writer 0600
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve(spec: str, revision: str | None = None, *, trust_remote_code: bool = False) -> SourceModel:
    """Turn what the user typed into a local, checked model folder.

    A folder that declares its own Python code (``auto_map``) is refused unless ``trust_remote_code``.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return open_folder(path, spec=spec, revision=revision, trust_remote_code=trust_remote_code)
    if path.is_file():
        if path.suffix == ".gguf":
            check_gguf_magic(path)
            folder = gguf_to_folder(path)
            return open_folder(folder, spec=spec)
        if path.name == "config.json":
            return open_folder(path.parent, spec=spec, trust_remote_code=trust_remote_code)
        raise ModelError(
            f"{spec} is a file, not a model.",
            "Give a Hugging Face model folder, a .gguf file, or a Hub id like org/name.",
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        folder = _download(spec, revision)
        return open_folder(folder, spec=spec, revision=revision, trust_remote_code=trust_remote_code)
    raise ModelError(
        f"{spec} does not exist.",
        "Give a Hugging Face model folder, a .gguf file, or a Hub id like org/name.",
    )


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise BackendUnavailableError(
            f"'{repo_id}' looks like a Hub id, and downloading needs huggingface_hub.",
            "pip install 'llmopt[hub]', or give a local folder.",
        ) from None
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"],
            )
        )
    except Exception as exc:
        raise ModelError(
            f"could not download '{repo_id}' from the Hub: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            "Check the id, your network and HF_TOKEN, or give a local folder instead.",
        ) from None
