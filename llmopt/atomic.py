"""Atomic file writes: a temp file in the target's folder, fsync, rename; the mode a plain write gives."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    # os.umask can only be read by setting it; put it straight back (single-threaded at this point of a write).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (someone else's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_dead_writers(folder: Path, pattern: str, pid_of: Callable[[str], str]) -> list[Path]:
    """Remove the folders in ``folder`` matching the glob ``pattern`` whose writer is gone: the process whose PID
    ``pid_of(name)`` reads from the folder's name no longer runs (killed mid-write, a crash). This process's own
    folders and those of live processes are kept. Returns what was removed."""
    import shutil

    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.glob(pattern):
        pid_text = pid_of(path.name)
        if not pid_text.isdigit() or not path.is_dir():
            continue
        pid = int(pid_text)
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def write_atomic(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``fill(file)`` on a temp file next to it and an atomic rename.

    mkstemp creates its file 0600; the result gets the mode ``open()`` would give (0666 less the umask),
    so reports and manifests stay readable by the people a folder is shared with.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON (indented, keys in insertion order, unknown types as str) atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def give_plain_folder(folder: Path) -> None:
    """``give_plain_modes`` for the files, and the mode ``mkdir`` would give (0777 less the umask) for ``folder`` and
    the folders in it: a folder made with ``tempfile.mkdtemp`` is 0700, so only its owner could read it."""
    give_plain_modes(folder)
    mode = 0o777 & ~_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)


def give_plain_modes(folder: Path) -> None:
    """Files a library wrote into ``folder`` get the mode ``open()`` would give (0666 less the umask).

    Some write through mkstemp (0600): GPTQModel's model.safetensors, for one, which a shared model folder
    or a server running as another user then cannot read.
    """
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)
