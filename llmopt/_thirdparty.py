"""Keeping third-party libraries' own console output out of llmopt's.

GPTQModel prints a banner and INFO lines, and draws live progress bars; where output is not a terminal
(a CI log) those bars become one line per update: ~15,600 lines for the CPU main job's two GPTQ
variants. llmopt reports progress itself, so before GPTQModel is first imported its logger is set to
warnings and above, and its live bars are replaced by the few per-layer lines it writes in
non-interactive test runs. Some of its modules also ``print`` debugging dumps on every save ("Files in
directory:", "Content of saved `config.json`:" and the whole JSON); those bare prints to stdout are
dropped in the modules listed in ``_PRINTING_MODULES``. ``LLMOPT_THIRD_PARTY_LOGS=1`` (or
``LLMOPT_DEBUG=1``) keeps everything.

``quiet_progress_bars`` turns tqdm's bars off for a block of third-party work that draws them unasked:
llm-compressor's calibration ("Preparing cache", "(3/31): Calibrating", "Calibrating"), its AWQ smoothing and
compressed-tensors' "Compressing model" while saving, datasets' ``map`` bars; in a CI log each is one line per
update.

``quiet_console`` (called by the CLI before any command runs, importing nothing heavy) does the same for
the rest of the stack: transformers' "Loading weights" / "Writing model shards" bars and huggingface_hub's
bars (one line per update in a CI log; llmopt's own steps say what is loading), torchao's "Failed to load
... .so" lines for kernels of other GPUs printed at its import, and torch's deprecation lines about
torchao's enums. transformers' warnings (e.g. weights left uninitialised) are kept.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

_done = False

# Loggers whose chatter says nothing about the user's model: import-time lines, GPTQModel's tokenizer
# helper announcing the pad token it picked (four times per GPTQ variant), accelerate's "weights are not
# tied" warning that GPTQModel's own loading triggers on tied-embedding models.
# datasets announces at import which array libraries it found ("JAX version 0.11.2 available"); bitsandbytes, on
# CPUs with AVX-512 bf16, that it could not download an optional kernel from the Hub ("Failed to load CPU
# gemm_4bit_forward from kernels-community ... pip install kernels") and falls back to its own.
_QUIET_LOGGERS = (
    "torchao",
    "torch.utils._pytree",
    "tokenicer",
    "accelerate.utils.modeling",
    "datasets",
    "bitsandbytes.backends.cpu.ops",
)

# GPTQModel modules whose bare print() calls are debugging output, not messages for the user.
_PRINTING_MODULES = (
    "gptqmodel.models.writer",
    "gptqmodel.models.auto",
    "gptqmodel.quantization.gptq",
    "gptqmodel.looper.awq_processor",
)


class _Discarding(io.TextIOBase):
    """A text stream that drops what is written to it (kept alive: logbar holds only a weak reference)."""

    def write(self, text: str) -> int:
        return len(text)


_DISCARD = _Discarding()


def _stdout_print_dropped(*args: Any, **kwargs: Any) -> None:
    """print() that drops what goes to stdout; prints with an explicit other ``file`` still go through."""
    target = kwargs.get("file")
    if target is not None and target is not sys.stdout and target is not sys.__stdout__:
        builtins.print(*args, **kwargs)


def _silence_debug_prints() -> None:
    import importlib

    for name in _PRINTING_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # another GPTQModel version's layout: leave it
            continue
        # Module globals come before builtins in name lookup, so this replaces print for that module only.
        module.print = _stdout_print_dropped  # type: ignore[attr-defined]


def third_party_logs_wanted() -> bool:
    return bool(os.environ.get("LLMOPT_THIRD_PARTY_LOGS") or os.environ.get("LLMOPT_DEBUG"))


def quiet_console() -> bool:
    """Quiet the stack's progress bars and import-time lines (see the module docstring); returns whether it did.

    Sets environment defaults and logger levels only, so it is cheap and must run before transformers,
    huggingface_hub or torchao are imported (transformers reads the progress-bar switch at import).
    """
    if third_party_logs_wanted():
        return False
    import logging

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


def configure_gptqmodel_env() -> None:
    """Before GPTQModel runs (quantizing or loading): environment it reads at start-up."""
    # GPTQModel sizes its CPU worker pools from the core count and refuses pools larger than the
    # parent on small machines (2 cores): give it the real count.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, os.cpu_count() or 1)))


@contextlib.contextmanager
def quiet_git_probe() -> Iterator[None]:
    """Inside the block, ``subprocess.check_output(["git", ...])`` sends git's stderr to /dev/null.

    GPTQModel 7.3.x (the newest that runs on torch < 2.14.1) asks ``git rev-parse`` for a commit at import, with
    git's stderr left open: outside a git work tree every run's log gains "fatal: not a git repository". Its
    failure is already ignored there (an empty suffix); only the line is dropped. Other calls are untouched.
    """
    import subprocess

    saved = subprocess.check_output

    def check_output(*args: Any, **kwargs: Any) -> Any:
        argv = args[0] if args else kwargs.get("args")
        if isinstance(argv, (list, tuple)) and argv[:1] == ["git"] and "stderr" not in kwargs:
            kwargs["stderr"] = subprocess.DEVNULL
        return saved(*args, **kwargs)

    subprocess.check_output = check_output
    try:
        yield
    finally:
        subprocess.check_output = saved


def quiet_gptqmodel() -> bool:
    """Quiet GPTQModel's console output (see the module docstring); returns whether it did.

    Call it before the first ``import gptqmodel``: the banner is printed at import. Later calls do nothing.
    """
    global _done
    if _done:
        return True
    if third_party_logs_wanted():
        return False
    try:
        # logbar's first shared logger (made when logbar is imported) prints an empty line to stdout "to clear space
        # from previous logs": one blank line in every GPTQ run's output. Let it go nowhere.
        with contextlib.redirect_stdout(_DISCARD):
            from logbar import LogBar

            shared = LogBar.shared()
        # ERROR, not WARN: its warnings are advice about its own set-up ("Python GIL is enabled ... We recommend
        # Python >= 3.13.3t", "Calibration dataset size should be more than 256", Marlin padding a layer) printed
        # into every run's log; llmopt says what the user needs itself (calibration size, kernel used).
        shared.setLevel("ERROR")
        with quiet_git_probe():
            from gptqmodel.utils import logger
    except Exception:  # not installed, or another version's layout: leave it as it is
        return False
    if callable(getattr(logger, "_suppress_live_renderables", None)):
        # GPTQModel's own switch for non-interactive runs: progress bars become occasional log lines.
        logger._suppress_live_renderables = lambda: True
    _silence_debug_prints()
    import warnings

    # transformers' deprecation notices triggered by GPTQModel's own calls (e.g. "`device` is deprecated ... for
    # `LlamaRotaryEmbedding.__init__`"): GPTQModel's to fix, nothing the user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"gptqmodel(\.|$)")
    _done = True
    return True


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[bool]:
    """tqdm's progress bars off inside the block, unless third-party logs are wanted; yields whether it did.

    Every tqdm bar (``tqdm.tqdm``, ``tqdm.auto.tqdm``, datasets' own subclass, a class imported by name before the
    block) is built by ``tqdm.std.tqdm.__init__``: for the block it defaults to ``disable=True``, the way tqdm's own
    ``TQDM_DISABLE`` works (which tqdm reads only when it is imported). A bar asked for with an explicit ``disable``
    keeps it. Iterating a disabled bar still yields every item, and ``update``/``set_postfix`` still work.
    """
    if third_party_logs_wanted():
        yield False
        return
    try:
        from tqdm import std
    except ImportError:  # no tqdm: no bars to quiet
        yield False
        return
    saved = std.tqdm.__dict__["__init__"]
    std.tqdm.__init__ = functools.partialmethod(saved, disable=True)
    try:
        yield True
    finally:
        std.tqdm.__init__ = saved
