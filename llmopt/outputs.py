"""Where llmopt may write: checks that keep an output from landing on the user's own files.

An artifact folder is replaced as a whole (staging folder + rename), so an output that is, holds or sits
inside an input would destroy that input; ``--overwrite`` therefore only ever replaces an empty folder or an
llmopt artifact holding nothing but its own files. Paths are compared after resolving ``~``, relative parts
and symlinks, so another spelling of the same folder is caught too. Report files (``--json``) get the same
care: never into an artifact (its files are hashed), never onto an input, never onto a file that is not JSON.

A lock beside each artifact folder keeps two processes from writing it at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmopt.artifact import MANIFEST_NAME, manifest_without_damaged_results
from llmopt.errors import NoSpaceError, OutputExistsError, OutputPathError

_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise OSError (safetensors' Rust writer, torch's zip writer) say "disk full".
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded")


def absolute(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, made absolute and normalized, symlinks left as they are.

    A ``..`` is taken the way the file system takes it: after the symlink before it (``link/../x`` is ``x`` beside
    the link's target, not beside the link). Removed as text (``os.path.abspath``), it named another file than the
    one that was read or written, and an input behind such a path passed the checks that keep outputs off inputs
    (a hostile tester's evaluation text, overwritten by the run's report.md)."""
    raw = Path(path).expanduser()
    if not raw.is_absolute():
        raw = Path.cwd() / raw
    parts = raw.parts
    if ".." not in parts:
        return Path(os.path.normpath(raw))
    last = len(parts) - 1 - parts[::-1].index("..")
    head = Path(os.path.realpath(Path(*parts[: last + 1])))  # up to the last "..": resolved as the OS resolves it
    return Path(os.path.normpath(head.joinpath(*parts[last + 1 :])))


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _enclosing_artifact(real: Path) -> Path | None:
    for folder in real.parents:
        with contextlib.suppress(OSError):  # a folder we may not look into holds no artifact of ours
            if (folder / MANIFEST_NAME).is_file():
                return folder
    return None


def is_stream(path: str | Path) -> bool:
    """True for an existing target that is not a plain file: a device (``/dev/null``, ``/dev/stderr``), a pipe
    or anything under /dev or /proc. A report goes into such a target as written; the atomic rename used for
    files would put a plain file in its place (as root, a new ``/dev/null``)."""
    target = absolute(path)
    if not target.exists():
        return False
    return not _real(target).is_file() or target.parts[1:2] in (("dev",), ("proc",))


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _require_writable(folder: Path, what: str) -> None:
    """``folder`` (or the folder that will hold it, once created) must accept new files."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputPathError(
            f"cannot create {what} {folder}: {existing} is a file, not a folder.", "Choose another path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(existing) else "permission denied"
        raise OutputPathError(
            f"cannot write {what} {folder}: {existing} is not writable ({reason}).",
            "Choose a folder you can write to.",
        )


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _foreign_files(folder: Path) -> list[str] | None:
    """Files in an artifact folder that its manifest does not list (None: the manifest does not parse)."""
    try:
        text = (folder / MANIFEST_NAME).read_text()
    except (OSError, ValueError):
        return None
    # a damaged stored evaluation does not make the folder someone else's: `llmopt run` reuses it and evaluates
    # again, `llmopt eval` replaces the evaluation
    manifest = manifest_without_damaged_results(text)
    if manifest is None:
        return None
    ours = set(manifest.files) | {MANIFEST_NAME}
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    return [rel for rel in present if rel not in ours]


def check_output(
    output: str | Path,
    inputs: Iterable[str | Path | None] = (),
    *,
    overwrite: bool = False,
    flag: str = "-o",
) -> Path:
    """Refuse an artifact output folder that would destroy or mix with the user's files; return it absolute.

    Refused: an output that is, is inside, or holds any of ``inputs`` that exist on disk (the model folder or
    .gguf file, the calibration text, an imatrix file; names such as ``wikitext2`` or Hub ids are skipped), the
    current folder or one that holds it, a folder inside another artifact, a file, an unwritable place, and a
    non-empty folder unless ``overwrite`` is set and it is an llmopt artifact with only its own files in it.
    Nothing is created. ``quantize`` runs it first (so each variant of ``llmopt run`` gets it too); a caller
    can run it earlier, e.g. for every variant's folder before the first one starts.
    """
    out = absolute(output)
    if out.is_symlink():
        # The folder the link points to is what the user means; replacing the link itself would leave that
        # folder untouched (and two spellings of one place would take two different locks).
        out = _real(out)
    if out.parent == out:
        raise OutputPathError(f"{flag} {output}: the root folder cannot be an artifact folder.", "Pass a subfolder.")
    real = _real(out)
    for spec in inputs:
        if spec is None or str(spec) == "":
            continue
        path = absolute(spec)
        if not path.exists():
            continue
        real_in = _real(path)
        if _within(real, real_in):
            where = "is the input {}: writing the artifact there would destroy it"
            if real != real_in:
                where = "is inside the input {}: the artifact would land among its files"
            raise OutputPathError(
                f"the output {output} {where.format(spec)}.",
                f"Choose an {flag} folder outside {spec}, e.g. a new folder next to it.",
            )
        if _within(real_in, real):
            raise OutputPathError(
                f"the output {output} holds the input {spec}: replacing the folder would delete it.",
                f"Choose an {flag} folder that does not contain {spec}, e.g. a new folder next to it.",
            )
    cwd = _real(Path.cwd())
    if _within(cwd, real):
        raise OutputPathError(
            f"the output {output} is the current folder{'' if real == cwd else ' or holds it'}: llmopt replaces "
            "its output folder as a whole, which would pull the folder out from under your shell.",
            f"Pass a new subfolder instead, e.g. {flag} ./quantized.",
        )
    art = _enclosing_artifact(real)
    if art is not None:
        raise OutputPathError(
            f"the output {output} is inside the artifact {art}, whose files are hashed in its {MANIFEST_NAME}.",
            f"Choose an {flag} folder outside {art}.",
        )
    if os.path.ismount(real):
        raise OutputPathError(
            f"the output {output} is a mount point: llmopt builds the artifact beside it and renames it into place, "
            "which cannot replace a mount point.",
            f"Pass a subfolder of it, e.g. {flag} {shlex.quote(str(Path(output) / 'quantized'))}.",
        )
    if out.exists() or out.is_symlink():
        if not real.is_dir():
            raise OutputExistsError(f"{output} exists and is not a folder.", f"Choose another {flag} folder.")
        if any(real.iterdir()):
            _check_replaceable(real, output, overwrite, flag)
    _require_writable(out.parent, "the output folder in")
    return out


def _check_replaceable(real: Path, output: str | Path, overwrite: bool, flag: str) -> None:
    if not (real / MANIFEST_NAME).is_file():
        raise OutputExistsError(
            f"{output} exists, is not empty and is not an llmopt artifact (it has no {MANIFEST_NAME}); llmopt only "
            "replaces artifacts and empty folders, --overwrite or not.",
            f"Choose a new {flag} folder.",
        )
    if not overwrite:
        raise OutputExistsError(
            f"{output} exists and is not empty.", f"Choose another {flag} folder, or pass --overwrite to replace it."
        )
    foreign = _foreign_files(real)
    if foreign is None:
        raise OutputExistsError(
            f"{output} has a {MANIFEST_NAME} that is not a valid llmopt manifest, so nothing shows which of its "
            "files llmopt wrote; llmopt does not replace it, --overwrite or not.",
            f"Choose a new {flag} folder (or remove {output} yourself if it is yours to remove).",
        )
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{output} is an llmopt artifact but also holds files it did not write ({shown}); "
            "--overwrite would delete them.",
            f"Move those files out of {output} first, or choose a new {flag} folder.",
        )


def unreplaceable_artifact(folder: str | Path) -> str | None:
    """Why ``check_output`` would refuse to replace the existing artifact folder ``folder`` even with
    ``overwrite`` (said after the folder's name), or None when it is missing, empty or a whole llmopt artifact."""
    real = _real(absolute(folder))
    if not real.exists():
        return None
    if not real.is_dir():
        return "is a file, not an artifact folder"
    if not any(real.iterdir()):
        return None
    if not (real / MANIFEST_NAME).is_file():
        return f"holds files but no {MANIFEST_NAME}"
    foreign = _foreign_files(real)
    if foreign is None:
        return f"has a {MANIFEST_NAME} that is not a valid llmopt manifest (edited or damaged)"
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"holds files its {MANIFEST_NAME} does not list ({shown})"
    return None


def check_report_file(path: str | Path, inputs: Iterable[str | Path | None] = (), *, flag: str = "--json") -> None:
    """Refuse a report file path before any work: a folder, a file inside an artifact (it would break the
    artifact's hashes, or be its manifest), one of the ``inputs``, an existing file that is not JSON, or a
    place that is not writable. ``-`` (stdout) is always fine."""
    if str(path) == "-":
        return
    target = absolute(path)
    if is_stream(target) and not target.is_dir():
        # nothing to replace or to read (reading a pipe or a terminal would wait for its writer)
        return
    if target.is_dir() or str(path).endswith(("/", os.sep)):
        raise OutputPathError(
            f"{flag} {path} is a folder; it needs a file name.",
            f"Pass a file, e.g. {flag} {shlex.quote(str(Path(path) / 'report.json'))}.",
        )
    real = _real(target)
    art = _enclosing_artifact(real)
    if art is not None:
        raise OutputPathError(
            f"{flag} {path} is inside the artifact {art}: "
            + (
                "it would replace the artifact's manifest."
                if real == art / MANIFEST_NAME
                else f"a file not listed in its {MANIFEST_NAME} makes the artifact fail verification (and publishing)."
            ),
            f"Write the report next to the artifact instead, e.g. {flag} {shlex.quote(art.name + '-report.json')}.",
        )
    for spec in inputs:
        if spec is None or str(spec) == "":
            continue
        p = absolute(spec)
        if p.exists() and _within(real, _real(p)):
            what = "would overwrite the input" if real == _real(p) else "is inside the input"
            raise OutputPathError(f"{flag} {path} {what} {spec}.", f"Choose another {flag} file, outside {spec}.")
    if target.exists() and not _is_json_file(target):
        raise OutputPathError(
            f"{flag} {path} exists and is not a JSON file; llmopt does not replace it.", f"Choose another {flag} file."
        )
    _require_writable(target.parent, "the report in")


def _is_json_file(path: Path) -> bool:
    try:
        if path.stat().st_size == 0:
            return True
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


# --- run folders ------------------------------------------------------------------------------------------

RUN_MARKER = ".llmopt-run"
ARTIFACTS_DIR = "artifacts"
# serving/: server logs and per-request records of evaluation.serving
_RUN_ENTRIES = {ARTIFACTS_DIR, "plots", "serving", "report.json", "report.md", RUN_MARKER}


def check_run_folder(out: Path, overwrite: bool, *, flag: str = "--output", can_overwrite: bool = True) -> None:
    """A run writes into a new or empty folder, one an earlier run made, or, with ``overwrite``, any folder.

    Even with ``overwrite`` a run only writes its own names (``artifacts/VARIANT``, ``report.*``, ``plots/``)
    and deletes nothing else; the filesystem root and the home folder are never run folders. ``can_overwrite``:
    whether the command has an --overwrite to offer (``report merge`` has none).
    """
    offer = (
        f"Choose a new {flag} folder, or pass --overwrite to write the run's files there "
        "(report.json, report.md, plots/, artifacts/, serving/; nothing else is touched)."
        if can_overwrite
        else f"Choose a new {flag} folder (or an empty one)."
    )
    resolved = out.resolve()
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        what = "the filesystem root" if resolved == Path(resolved.anchor) else "your home folder"
        raise OutputExistsError(
            f"output folder {out} is {what}: "
            "a run writes report.json, report.md, plots/ and artifacts/ there.",
            f"Give a folder of its own, e.g. {flag} llmopt-runs/NAME.",
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is a file.", f"Choose another {flag} folder.")
    _check_run_entries(out, flag)
    if overwrite or (out / RUN_MARKER).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _RUN_ENTRIES and not p.name.startswith(".report."))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"{out} is not empty and was not made by llmopt run (it holds {shown}).",
            offer,
        )
    if any(out.iterdir()) and not ((out / "report.json").is_file() and _is_run_report(out / "report.json")):
        # report.md or plots/ alone prove nothing: they may be the user's own
        raise OutputExistsError(
            f"{out} is not empty and holds no report of llmopt run, so nothing shows that llmopt made it.",
            offer,
        )


# What a run writes under these names: a folder (artifacts/, plots/, serving/) or a file (report.json, report.md).
_RUN_FOLDERS = (ARTIFACTS_DIR, "plots", "serving")
_RUN_FILES = ("report.json", "report.md")


def _check_run_entries(out: Path, flag: str) -> None:
    """The run's own names in ``out`` are of the kind it writes: a file named ``plots`` or a folder named
    ``report.json`` made every variant fail, or the run crash after the last one with its report left half done."""
    wrong = [f"{name} is a file" for name in _RUN_FOLDERS if (out / name).exists() and not (out / name).is_dir()]
    wrong += [f"{name} is a folder" for name in _RUN_FILES if (out / name).is_dir()]
    wrong += [
        f"{name} is a link to nothing"
        for name in (*_RUN_FOLDERS, *_RUN_FILES)
        if (out / name).is_symlink() and not (out / name).exists()
    ]
    if wrong:
        raise OutputExistsError(
            f"cannot write the run's files in {out}: {', '.join(wrong)} "
            "(a run writes artifacts/, plots/ and serving/ as folders, report.json and report.md as files).",
            f"Move those away, or choose another {flag} folder.",
        )


def _is_run_report(path: Path) -> bool:
    """A report.json that ``llmopt run`` (or ``report merge``) wrote: schema ``llmopt.run/N``, any version."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("llmopt.run/")


def claim_run_folder(out: Path) -> None:
    """Create the run folder and mark it as a run's (``--overwrite`` let the user hand a folder to runs)."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / RUN_MARKER
    if not marker.exists():
        marker.write_text("This folder was made by `llmopt run`; later runs may write here without --overwrite.\n")



# --- lock ------------------------------------------------------------------------------------------------


def lock_path(out: Path) -> Path:
    """The lock file of ``out``: beside the folder it really is (through symbolic links), so that two spellings of
    one folder (a link to it, ``a/../out``) share one lock."""
    real = out.resolve()
    return real.parent / f".{real.name}.llmopt-lock"


def _held_by_another(lock: Path) -> str | None:
    """The holder's PID (text, maybe empty) if a process other than this one holds ``lock`` now; else None."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no such lock: nobody writes there
        return None
    try:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        if holder == str(os.getpid()):
            return None  # this process: a run writing its own artifact
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return holder
        fcntl.flock(fd, fcntl.LOCK_UN)  # a lock file left unlocked (its process was killed): nobody
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: Path, *, flag: str = "-o") -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (a hidden file beside it) for the duration of the block.

    The kernel releases a flock when its process dies, so a killed run leaves no stale lock: at most an
    unlocked file, reused by the next run. A second process fails at once, naming the holder's PID.
    Without fcntl (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputPathError(
                f"cannot create the lock file {path.name} in {path.parent}: {exc.strerror}.",
                f"Choose an {flag} folder in a place you can write to.",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"PID {holder}" if holder.isdigit() else "another process"
            raise OutputPathError(
                f"another llmopt process ({who}) is writing {out} right now.",
                f"Wait for it to finish, or choose another {flag} folder.",
            ) from None
        # The previous holder unlinks the file on release; if that happened between our open and our lock,
        # we hold a lock on a file nobody else will see: start over with the path's current file.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    # A folder inside one another process is writing (`quantize -o RUN/artifacts/VARIANT` beside `run -o RUN`) is
    # that process's too: its lock sits beside RUN, not beside the subfolder.
    for parent in out.resolve().parents:
        writer = _held_by_another(lock_path(parent)) if parent != parent.parent else None
        if writer is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)
            os.close(fd)
            who = f"PID {writer}" if writer.isdigit() else "another process"
            raise OutputPathError(
                f"another llmopt process ({who}) is writing {parent}, which holds {out}, right now.",
                f"Wait for it to finish, or choose an {flag} folder outside it.",
            )
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created (deepest first), for ``remove_empty``."""
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_empty(missing)
        raise OutputPathError(f"cannot create {folder}: {exc.strerror}.", "Choose a folder you can write to.") from None
    return missing


def remove_empty(folders: list[Path]) -> None:
    for f in folders:
        with contextlib.suppress(OSError):
            f.rmdir()


# --- disk full -------------------------------------------------------------------------------------------


def is_no_space(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) says the disk or quota is full."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _NO_SPACE_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def no_space_error(exc: BaseException, out: Path) -> NoSpaceError:
    """The user-facing error for a full disk while writing ``out`` (call after removing the partial output)."""
    filename = getattr(exc, "filename", None)
    folder = Path(filename).parent if filename else out.parent
    folder = _nearest_existing(folder)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    shown = "?" if free is None else f"{free / 1e6:.1f} MB"
    return NoSpaceError(
        f"no space left on device while writing {out} (in {folder}: {shown} free now, after removing "
        "the partial output).",
        "Free space there, or pass -o a folder on a disk with more room.",
    )
