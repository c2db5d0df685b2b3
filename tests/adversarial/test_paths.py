"""Never lose a user's files: outputs onto, inside or above inputs, --overwrite, --json targets, read-only and
full disks, concurrent runs (issue 12, path/output items).

CLI cases run a real process from another working folder with relative paths, as a user types them. The model
is SmolLM2 cut to two decoder layers (its real weights): bnb-int8 quantizes it in seconds, so a case that
used to destroy files really did, and a refusal must come before any of that work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmopt.artifact import MANIFEST_NAME
from llmopt.errors import EXIT_ARTIFACT, EXIT_INPUT, EXIT_OK, EXIT_UNAVAILABLE, OutputExistsError, OutputPathError
from llmopt.outputs import check_output, lock_path
from tests.helpers import first_layers, run_cli


@pytest.fixture(scope="module")
def small_model(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return first_layers(assets["model"], tmp_path_factory.mktemp("cut") / "smollm2-2l", 2)


def user_model(small_model: Path, folder: Path) -> Path:
    """A user's model folder: the model's files (linked, to save disk) plus notes of their own."""
    folder.mkdir(parents=True)
    for f in small_model.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "NOTES.txt").write_text("my notes\n")
    return folder


def listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def artifact(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A real bnb-int8 artifact in a folder whose name has a space; (cwd, artifact, quantize's stdout)."""
    cwd = tmp_path_factory.mktemp("art")
    shutil.copytree(small_model, cwd / "model")
    r = run_cli(["quantize", "model", "-m", "bnb-int8", "--device", "cpu", "-o", "my models/int8"], cwd=cwd)
    assert r.returncode == EXIT_OK, r.stderr
    return cwd, cwd / "my models" / "int8", r.stdout


def quantize(args: list[str], cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return run_cli(["quantize", *args, "-m", "bnb-int8", "--device", "cpu"], cwd=cwd, **kw)  # type: ignore[arg-type]


# --- 1. outputs equal to, inside or above an input ------------------------------------------------------------


def test_overwrite_onto_the_source_is_refused(small_model: Path, tmp_path: Path) -> None:
    """`quantize fx/victim -o fx/victim --overwrite` deleted the FP16 folder and the notes in it, exit 0."""
    victim = user_model(small_model, tmp_path / "fx" / "victim")
    before = listing(victim)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = quantize(["../fx/victim", "-o", "../fx/victim", "--overwrite"], cwd=elsewhere)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "is the input ../fx/victim" in r.stderr
    assert listing(victim) == before


def test_overwrite_above_the_source_is_refused(small_model: Path, tmp_path: Path) -> None:
    """`quantize fx/proj/model -o fx/proj --overwrite` deleted the model and the thesis next to it."""
    proj = tmp_path / "fx" / "proj"
    user_model(small_model, proj / "model")
    (proj / "thesis.tex").write_text("\\documentclass{article}\n")
    before = listing(proj)
    r = quantize(["fx/proj/model", "-o", "fx/proj", "--overwrite"], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "holds the input fx/proj/model" in r.stderr
    assert listing(proj) == before


def test_output_inside_the_source_is_refused(small_model: Path, tmp_path: Path) -> None:
    """An artifact folder inside the model folder mixes the artifact into the user's model."""
    victim = user_model(small_model, tmp_path / "victim")
    before = listing(victim)
    r = quantize(["victim", "-o", "victim/int8"], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "is inside the input victim" in r.stderr
    assert listing(victim) == before


def test_other_spellings_of_the_source_are_caught(small_model: Path, tmp_path: Path) -> None:
    """A symlink to the model folder, `~` (not expanded by a shell when quoted) and `a/../b` are the same folder."""
    victim = user_model(small_model, tmp_path / "home" / "victim")
    before = listing(victim)
    (tmp_path / "link").symlink_to(victim)
    env = {"HOME": str(tmp_path / "home")}
    for out in ("link", "~/victim", "home/../home/victim"):
        r = quantize(["home/victim", "-o", out, "--overwrite"], cwd=tmp_path, env=env)
        assert r.returncode == EXIT_INPUT, (out, r.stderr)
        assert "is the input home/victim" in r.stderr, out
    assert listing(victim) == before


def test_output_above_the_calibration_text_is_refused(small_model: Path, tmp_path: Path) -> None:
    """The calibration file sat in an artifact folder that --overwrite replaced."""
    model = user_model(small_model, tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text("some calibration text\n" * 50)
    (data / MANIFEST_NAME).write_text("{}")  # looks like an artifact: --overwrite alone would not refuse it
    r = quantize([str(model), "--calibration", "data/calib.txt", "-o", "data", "--overwrite"], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "holds the input data/calib.txt" in r.stderr
    assert (data / "calib.txt").is_file()


def test_output_above_an_imatrix_file_is_refused(tmp_path: Path) -> None:
    """gguf's `imatrix` option names a file of the user's: an output holding it is refused like the model."""
    from llmopt.api import _input_paths
    from llmopt.backends.gguf import GGUFOptions

    (tmp_path / "mats").mkdir()
    (tmp_path / "mats" / "imatrix.dat").write_bytes(b"\0" * 16)
    opts = GGUFOptions.model_validate({"imatrix": str(tmp_path / "mats" / "imatrix.dat"), "quant_type": "q4_k_m"})
    with pytest.raises(OutputPathError, match="holds the input"):
        check_output(tmp_path / "mats", _input_paths("org/model", None, opts), overwrite=True)


def test_overwrite_of_the_artifact_holding_the_imatrix_is_refused(
    small_model: Path, assets: dict[str, Path], tmp_path: Path
) -> None:
    """`--imatrix auto` keeps the matrix in the artifact; quantizing again with `--imatrix A/imatrix.gguf -o A
    --overwrite` (another type, same folder) replaced A, deleting the matrix it had just read. (A relative `-o`
    also broke gguf outright: llama.cpp's converter runs in another folder; the output is now made absolute.)"""
    from llmopt.backends.base import get_backend
    from llmopt.errors import BackendUnavailableError

    try:
        get_backend("gguf")
    except BackendUnavailableError as exc:
        pytest.skip(f"gguf backend not usable here: {exc.message}")
    model = str(user_model(small_model, tmp_path / "model"))  # absolute: llama.cpp's converter needs it so
    calib = str(assets["calibration_text"])
    r = run_cli(["quantize", model, "-m", "gguf", "--quant-type", "q4_k_m", "--imatrix", "auto", "--calibration",
                 calib, "--samples", "4", "--seq-len", "64", "-o", "A"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == EXIT_OK, r.stderr
    before = listing(tmp_path / "A")
    r = run_cli(["quantize", model, "-m", "gguf", "--quant-type", "q5_k_m", "--imatrix", "A/imatrix.gguf", "-o", "A",
                 "--overwrite"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "holds the input A/imatrix.gguf" in r.stderr
    assert listing(tmp_path / "A") == before


def test_overwrite_replaces_only_llmopt_artifacts(small_model: Path, tmp_path: Path) -> None:
    """--overwrite on a folder of the user's (no llmopt.json) deleted it after quantizing, exit 0."""
    model = user_model(small_model, tmp_path / "model")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    r = quantize([str(model), "-o", "mine", "--overwrite"], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "only replaces artifacts and empty folders" in r.stderr
    assert (mine / "thesis.tex").read_text() == "years of work\n"


def test_overwrite_keeps_files_added_to_an_artifact(artifact: tuple[Path, Path, str], tmp_path: Path) -> None:
    """An artifact folder that also holds a file of the user's is not replaced by --overwrite."""
    cwd, art, _ = artifact
    copy = tmp_path / "int8"
    shutil.copytree(art, copy, copy_function=os.link)
    (copy / "NOTES.txt").write_text("results discussion\n")
    r = quantize([str(cwd / "model"), "-o", "int8", "--overwrite"], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "NOTES.txt" in r.stderr and "holds files it did not write" in r.stderr
    assert (copy / "NOTES.txt").is_file()


def test_library_quantize_refuses_too(small_model: Path, tmp_path: Path) -> None:
    """The checks live in api.quantize, so `llmopt run` (and any Python caller) gets them: its per-variant folder
    artifacts/NAME being the recipe's model is refused, even with the overwrite=True that run passes."""
    from llmopt import api

    model = user_model(small_model, tmp_path / "runs" / "artifacts" / "int8")
    before = listing(model)
    with pytest.raises(OutputPathError, match="is the input"):
        api.quantize(str(model), "bnb-int8", tmp_path / "runs" / "artifacts" / "int8", overwrite=True, device="cpu")
    assert listing(model) == before


def test_check_output_unit_cases(tmp_path: Path) -> None:
    """The library check alone: names and Hub ids are not paths; an empty folder is fine; a file is not."""
    assert check_output(tmp_path / "new", ["wikitext2", "org/model", None]) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", [])
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output(tmp_path / "f", [], overwrite=True)
    with pytest.raises(OutputPathError, match="root folder"):
        check_output("/", [], overwrite=True)


# --- 2. --json targets ------------------------------------------------------------------------------------------


def _eval(cwd: Path, art: str, json_target: str, assets: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return run_cli(
        ["eval", art, "--baseline", "model", "--dataset", str(assets["eval_text"]), "--context", "32",
         "--max-tokens", "64", "--device", "cpu", "--json", json_target],
        cwd=cwd,
    )  # fmt: skip


def test_eval_json_onto_the_manifest_is_refused(artifact: tuple[Path, Path, str], assets: dict[str, Path]) -> None:
    """`eval --json ARTIFACT/llmopt.json` replaced the manifest by the report (exit 0); publish then failed."""
    cwd, art, _ = artifact
    before = listing(art)
    r = _eval(cwd, "my models/int8", "my models/int8/llmopt.json", assets)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "replace the artifact's manifest" in r.stderr
    assert "perplexity" not in r.stdout  # refused before any evaluation
    assert listing(art) == before


def test_eval_json_into_the_artifact_is_refused(artifact: tuple[Path, Path, str], assets: dict[str, Path]) -> None:
    """A report file inside the artifact made later publishing refuse (a file not in the manifest)."""
    cwd, art, _ = artifact
    r = _eval(cwd, "my models/int8", "my models/int8/report.json", assets)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "fail verification" in r.stderr
    assert not (art / "report.json").exists()


def test_eval_json_to_a_folder_is_refused_up_front(artifact: tuple[Path, Path, str], assets: dict[str, Path]) -> None:
    """`--json FOLDER` failed with a traceback after the whole evaluation, the manifest already rewritten."""
    cwd, art, _ = artifact
    before = (art / MANIFEST_NAME).read_bytes()
    (cwd / "reports").mkdir(exist_ok=True)
    r = _eval(cwd, "my models/int8", "reports", assets)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "is a folder" in r.stderr and "Traceback" not in r.stderr
    assert (art / MANIFEST_NAME).read_bytes() == before


def test_eval_json_onto_the_eval_text_or_a_non_json_file(
    artifact: tuple[Path, Path, str], assets: dict[str, Path], tmp_path: Path
) -> None:
    """The report must not replace the evaluation text, nor any file that is not a JSON report."""
    cwd, art, _ = artifact
    text = tmp_path / "eval.txt"
    shutil.copy(assets["eval_text"], text)
    r = run_cli(["eval", str(art), "--baseline", str(cwd / "model"), "--dataset", "eval.txt", "--context", "32",
                 "--max-tokens", "64", "--device", "cpu",
                 "--json", "eval.txt"], cwd=tmp_path)  # fmt: skip
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "would overwrite the input eval.txt" in r.stderr
    (tmp_path / "thesis.tex").write_text("years of work\n")
    r = _eval(cwd, "my models/int8", str(tmp_path / "thesis.tex"), assets)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "is not a JSON file" in r.stderr
    assert (tmp_path / "thesis.tex").read_text() == "years of work\n"


def test_bench_json_into_the_artifact_is_refused(artifact: tuple[Path, Path, str]) -> None:
    """`bench --json` gets the same up-front check as eval's."""
    cwd, art, _ = artifact
    r = run_cli(["bench", "my models/int8", "--device", "cpu", "--batch-sizes", "1", "--prompt-lens", "8",
                 "--gen-len", "2", "--warmup", "0", "--repetitions", "1", "--json", "my models/int8/speed.json"],
                cwd=cwd)  # fmt: skip
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "inside the artifact" in r.stderr
    assert not (art / "speed.json").exists()


def test_eval_hint_for_a_folder_without_manifest_does_not_suggest_overwrite(tmp_path: Path) -> None:
    """The hint 'quantize again with -o pointing at this folder and --overwrite' led users into deleting it."""
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "thesis.tex").write_text("x")
    r = run_cli(["eval", "stuff", "--baseline", "m", "--dataset", "t.txt"], cwd=tmp_path)
    assert r.returncode == EXIT_ARTIFACT, r.stderr
    assert "no llmopt.json" in r.stderr
    assert "--overwrite" not in r.stderr


# --- 3. weak spots ----------------------------------------------------------------------------------------------


def test_next_hint_quotes_paths(artifact: tuple[Path, Path, str]) -> None:
    """The `next:` command printed after quantize must paste back as one argument per path."""
    _, art, stdout = artifact
    line = next(ln for ln in stdout.splitlines() if "next:" in ln)
    argv = shlex.split(line.split("next:", 1)[1])
    assert argv[:3] == ["llmopt", "eval", str(art)]
    assert argv[argv.index("--baseline") + 1] == "model"


def test_output_is_the_current_folder(small_model: Path, tmp_path: Path) -> None:
    """`-o . --overwrite` from an empty folder quantized everything, then failed: refuse it before any work."""
    model = user_model(small_model, tmp_path / "model")
    here = tmp_path / "here"
    here.mkdir()
    start = time.monotonic()
    r = quantize([str(model), "-o", ".", "--overwrite"], cwd=here)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "is the current folder" in r.stderr
    assert "loading and quantizing" not in r.stderr
    assert time.monotonic() - start < 60


@contextlib.contextmanager
def _mounted_tmpfs(where: Path, options: str) -> Iterator[None]:
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder no one may write in: permission bits for a normal user, a read-only mount for root (whom
    permission bits do not stop)."""
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        ro.mkdir()
        ro.chmod(0o555)
        try:
            yield ro
        finally:
            ro.chmod(0o755)
        return
    if sys.platform != "linux":
        pytest.skip("needs Linux to make a read-only folder as root")
    with _mounted_tmpfs(ro, "ro,size=1m"):
        yield ro


def test_read_only_output_place(small_model: Path, read_only_dir: Path, tmp_path: Path) -> None:
    """A read-only output place gave exit 1 and a traceback: now exit 2 before any work, naming the folder."""
    model = user_model(small_model, tmp_path / "model")
    r = quantize([str(model), "-o", "ro/int8"], cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "Traceback" not in r.stderr
    assert "is not writable" in r.stderr and str(read_only_dir) in r.stderr


def test_output_is_a_mount_point(small_model: Path, tmp_path: Path) -> None:
    """`-o /mnt/usb` (an empty, mounted disk) quantized everything and then failed to rename the result onto the
    mount point, with a traceback: refuse it up front and suggest a subfolder."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount a tmpfs")
    model = user_model(small_model, tmp_path / "model")
    with _mounted_tmpfs(tmp_path / "usb", "size=200m"):
        r = quantize([str(model), "-o", "usb"], cwd=tmp_path)
        assert r.returncode == EXIT_INPUT, r.stderr
        assert "is a mount point" in r.stderr and "usb/quantized" in r.stderr
        assert list((tmp_path / "usb").iterdir()) == []


def test_eval_of_a_read_only_artifact_fails_before_scoring(
    artifact: tuple[Path, Path, str], assets: dict[str, Path], tmp_path: Path
) -> None:
    """eval records its result in the artifact's llmopt.json: on a read-only artifact it used to score both
    models and then fail with a traceback; now it says so at once (exit 2)."""
    cwd, art, _ = artifact
    ro = tmp_path / "ro"
    if os.geteuid() != 0:
        shutil.copytree(art, ro / "int8")
        (ro / "int8").chmod(0o555)
        guard: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    else:
        if sys.platform != "linux":
            pytest.skip("needs Linux to make a read-only folder as root")
        guard = _mounted_tmpfs(ro, "size=200m")
    with guard:
        if os.geteuid() == 0:
            shutil.copytree(art, ro / "int8")
            subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        r = run_cli(["eval", "ro/int8", "--baseline", str(cwd / "model"), "--dataset", str(assets["eval_text"]),
                     "--context", "32", "--max-tokens", "64", "--device", "cpu"], cwd=tmp_path)  # fmt: skip
        assert r.returncode == EXIT_INPUT, r.stderr
        assert "is not writable" in r.stderr and "Traceback" not in r.stderr
        assert "perplexity of" not in r.stderr  # nothing was scored
    if os.geteuid() != 0:
        (ro / "int8").chmod(0o755)


def test_disk_full(small_model: Path, tmp_path: Path) -> None:
    """A disk that fills up: exit 4, 'no space left on device', the folder and its free space named; the staging
    folder and the lock are gone and the output was never created."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount a small tmpfs")
    model = user_model(small_model, tmp_path / "model")
    small = tmp_path / "small"
    with _mounted_tmpfs(small, "size=8m"):
        r = quantize([str(model), "-o", "small/int8"], cwd=tmp_path)
        assert r.returncode == EXIT_UNAVAILABLE, r.stderr
        assert "no space left on device" in r.stderr and "Traceback" not in r.stderr
        assert str(small) in r.stderr and "MB free" in r.stderr
        assert list(small.iterdir()) == []


def test_read_only_baseline_cache_warns_and_goes_on(
    artifact: tuple[Path, Path, str], assets: dict[str, Path], read_only_dir: Path, tmp_path: Path
) -> None:
    """A read-only LLMOPT_CACHE: one warning, the evaluation completes (exit 0), nothing cached."""
    cwd, art, _ = artifact
    work = tmp_path / "work"
    shutil.copytree(art, work / "int8", copy_function=shutil.copy)  # eval records into the manifest: a copy
    r = run_cli(
        ["eval", str(work / "int8"), "--baseline", str(cwd / "model"), "--dataset", str(assets["eval_text"]),
         "--context", "32", "--max-tokens", "64", "--device", "cpu", "--json", "report.json"],
        cwd=work,
        env={"LLMOPT_CACHE": str(read_only_dir / "cache")},
    )  # fmt: skip
    assert r.returncode == EXIT_OK, r.stderr
    assert r.stderr.count("cannot write the FP16 baseline cache") == 1
    report = json.loads((work / "report.json").read_text())
    assert report["baseline"]["cached"] is False
    # FP16's side of the KL divergence went to a temporary folder instead, removed afterwards
    assert report["artifact"]["distribution"]["tokens"] == report["settings"]["tokens_scored"]


def _wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _start_quantize(model: Path, out: str, cwd: Path) -> subprocess.Popen[str]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen(
        [sys.executable, "-m", "llmopt", "quantize", str(model), "-m", "bnb-int8", "--device", "cpu", "-o", out],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_concurrent_quantizes_into_one_output(small_model: Path, tmp_path: Path) -> None:
    """Two quantizes into one output both exited 0, the second replacing the first without --overwrite: the
    second now fails at once (exit 2) naming the first one's PID, and the first finishes normally."""
    model = user_model(small_model, tmp_path / "model")
    first = _start_quantize(model, "out", tmp_path)
    try:
        _wait_for(lock_path(tmp_path / "out"), first)
        start = time.monotonic()
        r = quantize([str(model), "-o", "out"], cwd=tmp_path)
        assert r.returncode == EXIT_INPUT, r.stderr
        assert f"PID {first.pid}" in r.stderr
        assert time.monotonic() - start < 60
        _, err = first.communicate(timeout=600)
        assert first.returncode == EXIT_OK, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()
    assert not lock_path(tmp_path / "out").exists()


def test_no_stale_lock_after_kill_9(small_model: Path, tmp_path: Path) -> None:
    """A quantize killed outright leaves its lock file, but not its lock: the next run is not blocked."""
    model = user_model(small_model, tmp_path / "model")
    first = _start_quantize(model, "out", tmp_path)
    _wait_for(lock_path(tmp_path / "out"), first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    r = quantize(["missing-model", "-o", "out"], cwd=tmp_path)  # gets past the lock, then fails on the model
    assert r.returncode == EXIT_INPUT, r.stderr
    assert "another llmopt process" not in r.stderr
    assert "missing-model does not exist" in r.stderr
