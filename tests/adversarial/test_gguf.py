"""Hostile and careless use of the GGUF path: build script archives, relative paths, crashing llama.cpp."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_llamacpp.py"


def build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_llamacpp", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tar(path: Path, members: list[tuple[str, str, Any]]) -> Path:
    """(kind, name, payload): kind file (bytes), dir, sym / lnk (link target), chr, fifo."""
    with tarfile.open(path, "w:gz") as tf:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(payload)
                info.mode = 0o644
                tf.addfile(info, io.BytesIO(payload))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "sym": tarfile.SYMTYPE,
                "lnk": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.mode = payload if kind == "dir" else 0o644
            if kind in ("sym", "lnk"):
                info.linkname = payload
            tf.addfile(info)
    return path


SDIST = [
    ("dir", "pkg-1.0", 0o555),
    ("file", "pkg-1.0/pyproject.toml", b"[project]\nname='pkg'\n"),
    ("dir", "pkg-1.0/ro", 0o444),  # a folder without x bits must still be traversable
    ("file", "pkg-1.0/ro/data.txt", b"x"),
    ("sym", "pkg-1.0/alias.toml", "pyproject.toml"),
]

HOSTILE = {
    "dotdot": [("file", "pkg-1.0/../../evil.txt", b"x")],
    "absolute": [("file", "/tmp/llmopt-evil-abs.txt", b"x")],
    "symlink out": [("sym", "pkg-1.0/out", "../../..")],
    "symlink absolute": [("sym", "pkg-1.0/etc", "/etc")],
    "write through a symlink": [("sym", "pkg-1.0/here", "."), ("file", "pkg-1.0/here/x.txt", b"x")],
    "symlink chain out": [("sym", "pkg-1.0/c", "."), ("sym", "pkg-1.0/b", "c/../..")],
    "hard link out": [("lnk", "pkg-1.0/passwd", "../../etc/passwd")],
    "character device": [("chr", "pkg-1.0/null", "")],
    "fifo": [("fifo", "pkg-1.0/pipe", "")],
}


@pytest.fixture(params=["by hand", "filter"])
def branch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both unpack branches: hand checks alone (Python 3.11.0-3.11.3 without a backported filter, which
    this venv may be) and hand checks followed by tarfile's filter (3.11.4+, 3.12, backports): an archive
    is refused alike on both, though the filter alone would strip an absolute name or write through an
    in-tree link."""
    if request.param == "filter":
        if not hasattr(tarfile, "data_filter"):
            pytest.skip(f"Python {sys.version.split()[0]} has no tarfile filter (3.11.4+); the hand branch runs")
    else:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return str(request.param)


def test_unpack_of_a_good_sdist_on_both_branches(branch: str, tmp_path: Path) -> None:
    """A plain sdist unpacks; folder modes keep folders traversable; in-tree links are kept."""
    bs = build_script()
    archive = _tar(tmp_path / "pkg-1.0.tar.gz", SDIST)
    src = bs.unpack(archive, tmp_path / "work" / "src")
    assert src.name == "pkg-1.0" and (src / "pyproject.toml").is_file()
    assert (src / "ro" / "data.txt").read_text() == "x"  # would raise PermissionError under a 0o444 folder
    assert (src / "ro").stat().st_mode & 0o700 == 0o700
    assert (src / "alias.toml").read_text() == (src / "pyproject.toml").read_text()
    assert (src / "pyproject.toml").stat().st_mode & 0o7777 == 0o644


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused_and_nothing_is_left(branch: str, case: str, tmp_path: Path) -> None:
    """A hostile archive: the unpack stops with a message naming the archive; nothing lands outside the
    work folder and no half-unpacked tree is left to be taken for a source tree on the next run."""
    bs = build_script()
    archive = _tar(tmp_path / "evil.tar.gz", [*SDIST[:2], *HOSTILE[case]])
    dest = tmp_path / "a" / "b" / "src"
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        bs.unpack(archive, dest)
    assert "refusing to unpack" in str(exc.value) and "evil.tar.gz" in str(exc.value)
    assert not dest.exists()
    assert set(tmp_path.rglob("*")) - before <= {tmp_path / "a", tmp_path / "a" / "b"}
    assert not Path("/tmp/llmopt-evil-abs.txt").exists()


def test_script_unpacks_on_this_python_in_a_fresh_process(tmp_path: Path) -> None:
    """The script's download/unpack/build path as a fresh clone runs it, on the venv's Python (3.11.2
    here, before tarfile's filter): the sdist is given (no network), unpacked, and the first build step
    it would take is reached. Old code: TypeError: extractall() got an unexpected keyword 'filter'."""
    archive = _tar(tmp_path / "pkg-1.0.tar.gz", SDIST)
    code = (
        "import importlib.util, sys; from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('b', {str(SCRIPT)!r})\n"
        "b = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(b)\n"
        f"src = b.unpack(Path({str(archive)!r}), Path({str(tmp_path / 'src')!r}))\n"
        "print(sys.version_info[:3], src.name, (src / 'pyproject.toml').is_file())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "pkg-1.0 True" in proc.stdout


# --- relative paths from another folder ----------------------------------------------------------------


def _require_llamacpp() -> None:
    from llmopt.backends import gguf_toolchain as T

    if importlib.util.find_spec("llama_cpp") is None or T.find_toolchain() is None:
        pytest.skip("llama.cpp is not built here (python scripts/build_llamacpp.py)")


@pytest.mark.e2e
def test_relative_model_output_calibration_and_imatrix_paths(assets: dict[str, Path], tmp_path: Path) -> None:
    """`cd folder && llmopt quantize models/m -m gguf ... -o a/q` with every path relative: the converter
    runs in its own folder, so a relative path given to it was a FileNotFoundError blamed on the model
    (exit 2). Also --calibration (imatrix auto) and --imatrix FILE relative, then eval of the result."""
    from llmopt.backends import gguf_toolchain as T
    from tests.helpers import first_layers, run_cli

    _require_llamacpp()
    chain = T.find_toolchain()
    assert chain is not None
    user = tmp_path / "user"
    first_layers(Path(assets["model"]), user / "models" / "m2", 2)
    (user / "calib.txt").write_text(Path(assets["calibration_text"]).read_text())
    common = ["-m", "gguf", "--device", "cpu", "-q"]
    r = run_cli(["quantize", "models/m2", *common, "--quant-type", "q8_0", "-o", "a/q8"], cwd=user)
    assert r.returncode == 0, r.stderr
    assert list((user / "a" / "q8").glob("*-Q8_0.gguf"))
    if chain.imatrix_tool is not None:
        args = ["--quant-type", "q4_k_m", "--imatrix", "auto", "--calibration", "calib.txt", "--seq-len", "64"]
        r = run_cli(["quantize", "models/m2", *common, *args, "--samples", "2", "-o", "a/q4"], cwd=user)
        # llama-imatrix wants 2 chunks after its own re-tokenization (127 < 128 tokens): a data error
        assert r.returncode == 2 and "more --samples" in r.stderr and "Rebuild" not in r.stderr, r.stderr
        r = run_cli(["quantize", "models/m2", *common, *args, "--samples", "4", "-o", "a/q4"], cwd=user)
        assert r.returncode == 0, r.stderr
        assert (user / "a" / "q4" / "imatrix.gguf").is_file()
        args = ["--quant-type", "q4_0", "--imatrix", "a/q4/imatrix.gguf", "-o", "b/q4"]
        r = run_cli(["quantize", "models/m2", *common, *args], cwd=user)
        assert r.returncode == 0, r.stderr
    (user / "eval.txt").write_text(Path(assets["eval_text"]).read_text()[:6000])
    r = run_cli(
        ["eval", "a/q8", "--baseline", "models/m2", "--dataset", "eval.txt", "--context", "128", "-q"], cwd=user
    )
    assert r.returncode in (0, 3), r.stderr
    assert not list(user.glob(".llmopt-*")) and not list((user / "a").glob(".*"))


# --- llama.cpp dying in its child process --------------------------------------------------------------

FAKE_LLAMA_CPP = '''
"""A stand-in llama_cpp whose decode dies of SIGSEGV, as ggml's AMX path did on AVX-512/AMX Xeons."""
import ctypes


def llama_supports_gpu_offload():
    return False


def llama_backend_init():
    pass


def llama_model_size(model):
    return 1234


class Llama:
    def __init__(self, **kw):
        self.model = object()
        self.scores = None

    def n_vocab(self):
        return 100_000

    def reset(self):
        pass

    def eval(self, ids):
        ctypes.string_at(0)  # a read of address 0: SIGSEGV

    def close(self):
        pass
'''


def test_llama_cpp_crash_is_an_error_not_a_dead_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp segfaulting while scoring: the caller (pytest here, the CLI for users) survives and gets
    a BackendUnavailableError (exit 4) naming the signal, the likely cause and the rebuild command.
    Old code ran llama.cpp in-process: this test process itself died with exit 139."""
    from llmopt.errors import EXIT_UNAVAILABLE, BackendUnavailableError
    from llmopt.runners.llamacpp import LlamaCppRunner

    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.syspath_prepend(str(fake))  # find_spec in this process
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    runner = LlamaCppRunner(model, "cpu", threads=1)
    assert runner.n_vocab == 100_000 and runner.footprint_bytes() == 1234
    with pytest.raises(BackendUnavailableError) as exc:
        runner.nll([[1, 2, 3]], [1])
    text = str(exc.value)
    assert exc.value.exit_code == EXIT_UNAVAILABLE
    assert "SIGSEGV" in text and "scoring" in text and "another CPU" in text
    assert "scripts/build_llamacpp.py --rebuild" in text
    runner.close()  # after a crash: no hang, no second error


def test_text_file_named_gguf_is_not_a_gguf_file(tmp_path: Path) -> None:
    """`llmopt quantize notes.gguf ...` with a text file: 'not a GGUF file' (exit 2), before any library
    loads it; it used to go through transformers and end in a hint about the model's architecture."""
    from tests.helpers import run_cli

    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.gguf").write_text("just some text, not a model\n")
    r = run_cli(["quantize", "notes.gguf", "-m", "bnb-int8", "-o", "out", "--device", "cpu", "-q"], cwd=user)
    assert r.returncode == 2, r.stderr
    assert "is not a GGUF file" in r.stderr and "b'just'" in r.stderr
    assert "architecture" not in r.stderr and "Traceback" not in r.stderr
    assert not (user / "out").exists()


def test_backends_shows_install_hints_with_their_brackets(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    """`llmopt backends` printed "pip install 'llmopt'" for gguf: rich took '[gguf]' for a style tag. And
    llama-cpp-python's hint names the build script (PyPI has no wheels of it), not a bare pip install."""
    from llmopt.backends import base
    from llmopt.backends.gguf import GGUFBackend
    from llmopt.cli.main import main

    present = base.Requirement.present
    monkeypatch.setattr(
        base.Requirement, "present", lambda self: self.module not in ("llama_cpp", "sentencepiece") and present(self)
    )
    problems = GGUFBackend().check()
    assert any("llama-cpp-python" in p and "scripts/build_llamacpp.py" in p for p in problems)
    with pytest.raises(SystemExit) as exc:
        main(["backends"])
    out = capsys.readouterr().out
    assert exc.value.code in (0, None)
    assert "llmopt[gguf]" in out.replace("\n", "") or "'.[gguf]'" in out
    assert "pip install 'llmopt' " not in out


def _crashing_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(FAKE_LLAMA_CPP)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    return fake


def test_build_whose_smoke_decode_crashes_is_not_made_active(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build script after a build whose decode dies (ggml's AMX path on a Xeon): it exits non-zero
    saying what crashed on which CPU, and the stamp marks no active build, so llmopt does not use it."""
    import json

    bs = build_script()
    _crashing_llama_cpp(tmp_path, monkeypatch)
    vdir = tmp_path / "llc" / "9.9.9"
    flags = " ".join([*bs.CPU_FLAGS.split(), bs.FIXED_ARGS])
    key = bs.cache_key(flags, {})
    (vdir / "wheels" / key).mkdir(parents=True)
    (vdir / "wheels" / key / "llama_cpp_python-9.9.9-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    (vdir / "converter").mkdir()
    (vdir / "converter" / "convert_hf_to_gguf.py").write_text("# converter\n")
    installed: list[Path] = []
    monkeypatch.setattr(bs, "install_wheel", installed.append)
    monkeypatch.delenv("CMAKE_ARGS", raising=False)
    monkeypatch.setattr(
        sys, "argv", ["build_llamacpp.py", "--version", "9.9.9", "--dir", str(tmp_path / "llc"), "--no-tools"]
    )
    with pytest.raises(SystemExit) as exc:
        bs.main()
    assert "does not decode correctly on this CPU" in str(exc.value) and "--rebuild" in str(exc.value)
    stamp = json.loads((vdir / bs.STAMP).read_text())
    assert stamp["active"] is None
    entry = stamp["builds"][key]
    assert entry["smoke"]["ok"] is False and "SIGSEGV" in entry["smoke"]["problem"]
    assert entry["passed_on"] == [] and len(installed) == 1


def test_native_build_cache_key_holds_the_cpu() -> None:
    """A cache restored on another CPU must not reuse a native build (it crashed pytest in-process)."""
    bs = build_script()
    native, portable = "-DGGML_CUDA=OFF", "-DGGML_NATIVE=OFF -DGGML_CUDA=OFF"
    epyc = {"model": "AMD EPYC", "flags": ["avx2"]}
    xeon = {"model": "Intel Xeon", "flags": ["amx_tile", "avx2", "avx512f"]}
    assert bs.cache_key(native, epyc) != bs.cache_key(native, xeon)
    assert bs.cache_key(portable, epyc) == bs.cache_key(portable, xeon)


def test_backends_reports_a_build_that_does_not_decode_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`llmopt backends` where the stamp does not name this CPU: the smoke decode runs in a child
    process, its crash makes gguf unusable with the reason (the caller lives), and it is remembered."""
    import json

    from llmopt.backends import gguf_toolchain as T

    _crashing_llama_cpp(tmp_path, monkeypatch)
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "llc" / "9.9.9"
    (root / "converter").mkdir(parents=True)
    (root / "converter" / "convert_hf_to_gguf.py").write_text("# converter\n")
    other_cpu = {"model": "Some Other CPU", "machine": "x86_64", "flags": ["avx2"]}
    build = {"wheel": "w.whl", "passed_on": [other_cpu], "smoke": {"ok": True, "checked": {"q8_0": 0.01}}}
    (root / T.STAMP).write_text(json.dumps({"builds": {"k": build}, "active": "k"}))
    chain = T.Toolchain(version="9.9.9", root=root, converter=root / "converter", bin=None)
    ok, text = T.decode_check(chain)
    assert not ok and "SIGSEGV" in text and "--rebuild" in text
    memo = json.loads((tmp_path / "cache" / "llamacpp-smoke.json").read_text())
    assert len(memo) == 1 and next(iter(memo.values()))["ok"] is False
    # the same CPU named in the stamp: known without running anything
    from llmopt.runners.llamacpp_worker import cpu_identity

    build["passed_on"] = [cpu_identity()]
    (root / T.STAMP).write_text(json.dumps({"builds": {"k": build}, "active": "k"}))
    ok, text = T.decode_check(chain)
    assert ok and "decodes on this CPU" in text and "q8_0" in text
    # a build the script refused (no active build): reported without a smoke run
    build["smoke"] = {"ok": False, "problem": "llama.cpp crashed (SIGILL) decoding the tiny model"}
    (root / T.STAMP).write_text(json.dumps({"builds": {"k": build}, "active": None}))
    ok, text = T.decode_check(chain)
    assert not ok and "SIGILL" in text


@pytest.mark.e2e
def test_eval_whose_llama_cpp_crashes_exits_4_with_the_cause(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`llmopt eval` of a GGUF artifact where llama.cpp dies of SIGSEGV while scoring (a stand-in llama_cpp
    reads address 0): exit 4 with the signal and the rebuild command, no traceback; old code: exit 139."""
    from tests.helpers import first_layers, run_cli

    _require_llamacpp()
    user = tmp_path / "user"
    first_layers(Path(assets["model"]), user / "m2", 2)
    r = run_cli(["quantize", "m2", "-m", "gguf", "--quant-type", "f16", "-o", "f16", "--device", "cpu", "-q"], cwd=user)
    assert r.returncode == 0, r.stderr
    (user / "eval.txt").write_text(Path(assets["eval_text"]).read_text()[:4000])
    fake = _crashing_llama_cpp(tmp_path, monkeypatch)
    # --no-kld: the stand-in llama_cpp reports no real vocabulary, and the crash is what is tested here
    args = ["eval", "f16", "--baseline", "m2", "--dataset", "eval.txt", "--context", "64", "-q", "--no-kld"]
    r = run_cli(args, cwd=user, env={"PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"})
    assert r.returncode == 4, (r.returncode, r.stderr)
    assert "SIGSEGV" in r.stderr and "build_llamacpp.py --rebuild" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.e2e
def test_run_with_a_gguf_variant_and_a_relative_output(assets: dict[str, Path], tmp_path: Path) -> None:
    """`llmopt run recipe.yaml --output out/r` with a GGUF variant, from the recipe's folder: the variant's
    relative staging folder reached the converter, which runs elsewhere (exit 2, blamed on the model)."""
    from tests.helpers import first_layers, run_cli

    _require_llamacpp()
    user = tmp_path / "user"
    first_layers(Path(assets["model"]), user / "models" / "m2", 2)
    (user / "eval.txt").write_text(Path(assets["eval_text"]).read_text()[:4000])
    (user / "job.yaml").write_text(
        "name: rel\nmodel:\n  source: models/m2\nevaluation:\n  dataset: eval.txt\n  context_length: 64\n"
        "  max_tokens: 256\n  device: cpu\nvariants:\n  - name: q8\n    method: gguf\n    options:\n"
        "      quant_type: q8_0\n"
    )
    r = run_cli(["run", "job.yaml", "--output", "out/r", "-q"], cwd=user)
    assert r.returncode == 0, r.stderr
    assert list((user / "out" / "r").rglob("*-Q8_0.gguf"))


def _fake_sdist(index: Path, version: str) -> Path:
    """A llama-cpp-python sdist in miniature: a setuptools package plus the converter files the script copies."""
    name = f"llama_cpp_python-{version}"
    pyproject = (
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "llama-cpp-python"\nversion = "{version}"\n'
        '[tool.setuptools]\npackages = ["llama_cpp"]\n'
    )
    members: list[tuple[str, str, Any]] = [
        ("dir", name, 0o755),
        ("file", f"{name}/pyproject.toml", pyproject.encode()),
        ("file", f"{name}/PKG-INFO", f"Metadata-Version: 2.1\nName: llama-cpp-python\nVersion: {version}\n".encode()),
        ("file", f"{name}/llama_cpp/__init__.py", b"__version__ = 'fake'\n"),
        ("file", f"{name}/vendor/llama.cpp/convert_hf_to_gguf.py", b"# converter\n"),
        ("file", f"{name}/vendor/llama.cpp/gguf-py/gguf/__init__.py", b""),
    ]
    index.mkdir(parents=True)
    return _tar(index / f"{name}.tar.gz", members)


def test_download_unpack_build_path_on_this_python(tmp_path: Path) -> None:
    """The README's first-install path with empty caches, on the venv's Python (3.11.2 here: no tarfile
    filter): pip downloads the sdist (from a local index standing in for PyPI), the script unpacks it, copies
    the converter, builds the wheel and writes the stamp; a fresh process, as the README runs it. The
    compile of llama.cpp itself is left out (a tiny setuptools package stands in for it)."""
    import json

    _fake_sdist(tmp_path / "index", "9.9.9")
    env = dict(
        os.environ,
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(tmp_path / "index"),
        PIP_NO_BUILD_ISOLATION="0",  # pip's inverted spelling: no isolated build env (offline)
        CMAKE_ARGS="-DGGML_NATIVE=OFF",
    )
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--version",
        "9.9.9",
        "--dir",
        str(tmp_path / "llc"),
        "--no-tools",
        "--no-install",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vdir = tmp_path / "llc" / "9.9.9"
    stamp = json.loads((vdir / "llmopt-llamacpp.json").read_text())
    (entry,) = stamp["builds"].values()
    assert Path(entry["wheel"]).is_file() and entry["native"] is False
    assert (vdir / "converter" / "convert_hf_to_gguf.py").is_file()
    assert (vdir / "llama_cpp_python-9.9.9.tar.gz").is_file() and not (vdir / "work").exists()
    assert stamp["active"] is None and "not smoke-checked" in proc.stderr


@pytest.mark.e2e
def test_damaged_gguf_files_are_artifact_errors(tmp_path: Path) -> None:
    """A GGUF artifact file replaced by text (bad magic) or cut short (good magic): exit 5 naming the file,
    from a check in this process or llama.cpp's own refusal in the child, never a crash or a traceback."""
    from llmopt.errors import EXIT_ARTIFACT, ArtifactError
    from llmopt.runners.llamacpp import LlamaCppRunner

    _require_llamacpp()
    model = tmp_path / "m-Q8_0.gguf"
    for data, expected in (
        (b"hello, not a model\n", "not a GGUF file"),
        (b"GGUF\x03\0\0\0" + b"\xff" * 64, "could not load"),
    ):
        model.write_bytes(data)
        with pytest.raises(ArtifactError, match=expected) as exc:
            LlamaCppRunner(tmp_path, "cpu", threads=1)
        assert exc.value.exit_code == EXIT_ARTIFACT and str(model) in str(exc.value)


def test_statically_linked_libstdcxx_is_named_after_a_failed_smoke_check(tmp_path: Path) -> None:
    """Seen on the GPU machine: its compiler (CXX=/opt/gcc/bin/g++) linked libstdc++ statically into each llama.cpp
    library; every model load then crashed in std::regex, native or portable. The failure must say so and name the fix
    (the system compiler), not send the user to --rebuild with the same compiler."""
    build = build_script()
    libs = tmp_path / "lib"
    libs.mkdir()
    (libs / "libllama.so").write_bytes(b"\x7fELF...libggml.so.0\0libstdc++.so.6\0_ZNSt6vectorIiE")
    assert build.static_libstdcxx(libs) == []
    (libs / "libggml.so").write_bytes(b"\x7fELF...libc.so.6\0_ZNSt7codecvtIDsc11__mbstate_tE10do_unshift")
    assert build.static_libstdcxx(libs) == ["libggml.so"]


def test_a_compiler_that_links_libstdcxx_statically_is_refused_before_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GPU machine's CXX linked libstdc++ statically: the build took minutes and then crashed on every model
    load. The real compiler is asked, with and without -static-libstdc++, before anything is fetched or built."""
    bs = build_script()
    if shutil.which("g++") is None:
        pytest.skip("no g++ here")
    monkeypatch.setenv("CXX", "g++")
    assert bs.compiler_problem() is None  # the system's g++ links it dynamically
    monkeypatch.setenv("CXX", "g++ -static-libstdc++")
    problem = bs.compiler_problem()
    if problem is None:
        pytest.skip("this g++ cannot link libstdc++ statically (no libstdc++.a)")
    assert "CXX=g++ -static-libstdc++ does not link the shared libstdc++" in problem
    assert "CC=gcc CXX=g++ python scripts/build_llamacpp.py" in problem
    # the compiler CMake is told to use, and the flags CMake adds, are what is checked
    monkeypatch.setenv("CXX", "g++")
    assert bs.compiler_problem("-DCMAKE_CXX_COMPILER=g++") is None
    monkeypatch.setenv("LDFLAGS", "-static-libstdc++")  # the flags, not the compiler: said so, and what to drop
    assert "the build flags (-static-libstdc++; from CXXFLAGS" in (bs.compiler_problem() or "")
    monkeypatch.delenv("LDFLAGS")
    assert bs.compiler_problem("-DCMAKE_SHARED_LINKER_FLAGS=-static-libstdc++") is not None
    wrapper = tmp_path / "static-g++"
    wrapper.write_text('#!/bin/sh\nexec g++ -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    assert "CMAKE_CXX_COMPILER=" in (bs.compiler_problem(f"-DCMAKE_CXX_COMPILER:FILEPATH={wrapper}") or "")
    assert "CMAKE_CXX_COMPILER=" in (bs.compiler_problem(f"-D CMAKE_CXX_COMPILER={wrapper}") or "")
    monkeypatch.setenv("CXX", "g++ -static-libstdc++")

    def no_fetch(*_: Any) -> Path:
        raise AssertionError("fetched the sdist despite the compiler check")

    monkeypatch.setattr(bs, "fetch_sdist", no_fetch)
    monkeypatch.setattr(sys, "argv", ["build_llamacpp.py", "--version", "9.9.9", "--dir", str(tmp_path / "llc")])
    with pytest.raises(SystemExit) as exc:
        bs.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "does not link the shared libstdc++" in err and "--skip-compiler-check" in err
    assert not (tmp_path / "llc").exists()  # nothing made before the refusal
    # with the check skipped it goes on to fetch (where this test stops it)
    monkeypatch.setattr(sys, "argv", [*sys.argv, "--skip-compiler-check"])
    with pytest.raises(AssertionError, match="fetched the sdist"):
        bs.main()
    # a compiler that cannot build the probe, is not there, is not a command line, or hangs is left to CMake
    for cxx in ("false", "/nonexistent/g++", 'g++ "'):
        monkeypatch.setenv("CXX", cxx)
        assert bs.compiler_problem() is None
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nsleep 600\n")
    hang.chmod(0o755)
    monkeypatch.setenv("CXX", str(hang))
    monkeypatch.setattr(bs, "COMPILER_TIMEOUT", 1.0)
    assert bs.compiler_problem() is None
    left = subprocess.run(["pgrep", "-f", f"{hang}"], capture_output=True, text=True, check=False).stdout.split()
    assert left == []  # the hung compiler and its children are stopped


def test_ctrl_c_during_the_compiler_check_stops_the_compiler(tmp_path: Path) -> None:
    """The probe compiler runs in its own session (so a hang can be killed as a group): Ctrl-C must stop it too."""
    import signal
    import time

    hang = tmp_path / "hangxx"
    hang.write_text("#!/bin/sh\nsleep 300 &\nsleep 300\n")
    hang.chmod(0o755)
    env = dict(os.environ, CXX=str(hang))
    env.pop("CMAKE_ARGS", None)
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--dir", str(tmp_path / "llc"), "--version", "9.9.9"],
        env=env, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", str(hang)], capture_output=True, check=False).stdout:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the script's process group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    time.sleep(0.3)
    left = subprocess.run(["pgrep", "-f", str(hang)], capture_output=True, text=True, check=False).stdout.split()
    assert left == []


def _static_wrapper(tmp_path: Path, name: str = "static-g++") -> Path:
    """A g++ that links libstdc++ statically, as a GPU machine's CUDAHOSTCXX did (skips where g++ cannot)."""
    if shutil.which("g++") is None:
        pytest.skip("no g++ here")
    wrapper = tmp_path / name
    wrapper.write_text('#!/bin/sh\nexec g++ -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    if not build_script()._links_static([str(wrapper)], []):
        pytest.skip("this g++ cannot link libstdc++ statically (no libstdc++.a)")
    return wrapper


def test_a_cuda_host_compiler_that_links_libstdcxx_statically_is_refused_before_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Seen on a GPU machine: CC=gcc CXX=g++ passed the check, but its environment's CUDAHOSTCXX (a g++ that links
    libstdc++ statically) was nvcc's host compiler and linker: libggml-cuda.so needed no libstdc++.so and the smoke
    check crashed. With CUDA on, the CUDA host compiler CMake will use is asked too, and named with its fix."""
    bs = build_script()
    wrapper = _static_wrapper(tmp_path)
    for name in ("CMAKE_ARGS", "CXXFLAGS", "LDFLAGS", "CUDAHOSTCXX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CXX", "g++")
    assert bs.compiler_problem(bs.CUDA_FLAGS) is None  # CMake's default host compiler: the C++ compiler, fine here
    monkeypatch.setenv("CUDAHOSTCXX", str(wrapper))
    problem = bs.compiler_problem(bs.CUDA_FLAGS) or ""
    assert problem.startswith(
        f"CUDAHOSTCXX={wrapper} (the CUDA host compiler, from the CUDAHOSTCXX environment variable: nvcc compiles "
        "and links libggml-cuda.so with it) does not link the shared libstdc++"
    ), problem
    assert "CXX=g++ does not" not in problem  # the C++ compiler is not blamed
    assert "CUDAHOSTCXX=g++ python scripts/build_llamacpp.py --cuda" in problem
    assert "-DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++" in problem and "--skip-compiler-check" in problem
    # CUDA spelled as CMake reads a boolean, or off
    for on in ("-DGGML_CUDA=1", "-DGGML_CUDA:BOOL=on", "-D GGML_CUDA=ON", "-DGGML_CUDA=OFF -DGGML_CUDA=yes"):
        assert (bs.compiler_problem(on) or "").startswith(f"CUDAHOSTCXX={wrapper}"), on
    for off in ("", bs.CPU_FLAGS, "-DGGML_CUDA=0", "-DGGML_CUDA=ON -DGGML_CUDA=OFF", "-DGGML_CUDA_F16=ON"):
        assert bs.compiler_problem(off) is None, off  # a static CUDAHOSTCXX is not used without CUDA
    # -DCMAKE_CUDA_HOST_COMPILER wins over CUDAHOSTCXX, as in CMake
    system_gxx = shutil.which("g++")
    assert bs.compiler_problem(f"{bs.CUDA_FLAGS} -DCMAKE_CUDA_HOST_COMPILER={system_gxx}") is None
    monkeypatch.setenv("CUDAHOSTCXX", "g++")
    assert bs.compiler_problem(bs.CUDA_FLAGS) is None
    for define in (f"-DCMAKE_CUDA_HOST_COMPILER={wrapper}", f"-DCMAKE_CUDA_HOST_COMPILER:FILEPATH={wrapper}"):
        problem = bs.compiler_problem(f"{bs.CUDA_FLAGS} {define}") or ""
        assert problem.startswith(
            f"CMAKE_CUDA_HOST_COMPILER={wrapper} (the CUDA host compiler, from -DCMAKE_CUDA_HOST_COMPILER in "
            "CMAKE_ARGS: nvcc compiles and links libggml-cuda.so with it)"
        ), problem
        assert "e.g. the system's: -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++" in problem
        assert "CUDAHOSTCXX=g++" not in problem
    # both compilers wrong: both said in one run
    monkeypatch.setenv("CXX", "g++ -static-libstdc++")
    monkeypatch.setenv("CUDAHOSTCXX", str(wrapper))
    problem = bs.compiler_problem(bs.CUDA_FLAGS) or ""
    assert "CXX=g++ -static-libstdc++ does not link" in problem and f"\nCUDAHOSTCXX={wrapper} (the CUDA" in problem
    monkeypatch.setenv("CUDAHOSTCXX", "/nonexistent/nvcc-host-g++")  # not a command: left to CMake
    assert bs.compiler_problem(bs.CUDA_FLAGS) == bs.compiler_problem(bs.CPU_FLAGS)
    monkeypatch.setenv("CXX", "g++")
    assert bs.compiler_problem(bs.CUDA_FLAGS) is None

    # the script: --cuda (or CMAKE_ARGS with CUDA on) is refused with exit 2 before anything is made
    def no_fetch(*_: Any) -> Path:
        raise AssertionError("fetched the sdist despite the compiler check")

    monkeypatch.setenv("CUDAHOSTCXX", str(wrapper))
    monkeypatch.setattr(bs, "fetch_sdist", no_fetch)
    argv = ["build_llamacpp.py", "--version", "9.9.9", "--dir", str(tmp_path / "llc")]
    for cmake_args, extra in ((None, ["--cuda"]), ("-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90", [])):
        if cmake_args:
            monkeypatch.setenv("CMAKE_ARGS", cmake_args)
        monkeypatch.setattr(sys, "argv", [*argv, *extra])
        with pytest.raises(SystemExit) as exc:
            bs.main()
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"error: CUDAHOSTCXX={wrapper} (the CUDA host compiler" in err
        assert not (tmp_path / "llc").exists()
    # CUDA off, or the check skipped: it goes on to fetch (where this test stops it)
    monkeypatch.delenv("CMAKE_ARGS")
    for extra in ([], ["--cuda", "--skip-compiler-check"]):
        monkeypatch.setattr(sys, "argv", [*argv, *extra])
        with pytest.raises(AssertionError, match="fetched the sdist"):
            bs.main()


def test_a_static_libggml_cuda_is_blamed_on_the_cuda_host_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed smoke check, a libggml-cuda.so without a NEEDED libstdc++ is the CUDA host compiler's doing (nvcc
    links it): the hint used to blame CXX ("g++"), whose libraries were fine, and send the user back with it."""
    bs = build_script()
    libs = tmp_path / "lib"
    libs.mkdir()
    dynamic = b"\x7fELF...libstdc++.so.6\0_ZNSt6vectorIiE"
    static = b"\x7fELF...libc.so.6\0_ZNSt7codecvtIDsc11__mbstate_tE10do_unshift"
    (libs / "libllama.so").write_bytes(dynamic)
    (libs / "libggml.so").write_bytes(dynamic)
    (libs / "libggml-cuda.so").write_bytes(static)
    monkeypatch.setattr(bs, "_installed_lib_dir", lambda: libs)
    monkeypatch.setenv("CXX", "g++")
    monkeypatch.setenv("CUDAHOSTCXX", "/opt/gcc/bin/g++")
    hint = bs.failure_hint(bs.CUDA_FLAGS)
    assert hint.startswith(
        ": libggml-cuda.so links libstdc++ statically (nvcc links it with the CUDA host compiler, "
        "CUDAHOSTCXX=/opt/gcc/bin/g++, which does that)"
    ), hint
    assert hint.endswith("e.g. the system's: CUDAHOSTCXX=g++ python scripts/build_llamacpp.py --rebuild"), hint
    assert "CXX=g++ does that" not in hint and "CC=gcc" not in hint
    # the -D flag wins, and is what to change
    hint = bs.failure_hint(f"{bs.CUDA_FLAGS} -DCMAKE_CUDA_HOST_COMPILER=/opt/gcc/bin/g++")
    assert "with the CUDA host compiler, CMAKE_CUDA_HOST_COMPILER=/opt/gcc/bin/g++, which" in hint, hint
    assert hint.endswith(
        "python scripts/build_llamacpp.py --rebuild and -DCMAKE_CUDA_HOST_COMPILER=/usr/bin/g++ in CMAKE_ARGS"
    ), hint
    assert "CUDAHOSTCXX" not in hint
    # no host compiler set: CMake's default, named as such, and set explicitly in the fix
    monkeypatch.delenv("CUDAHOSTCXX")
    hint = bs.failure_hint(bs.CUDA_FLAGS)
    assert "with the CUDA host compiler, CMake's default, as CXX=g++, which does that" in hint, hint
    assert hint.endswith("CUDAHOSTCXX=g++ python scripts/build_llamacpp.py --rebuild"), hint
    # the other libraries are CXX's: each compiler named for its own libraries, both fixed in one command
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    monkeypatch.setenv("CUDAHOSTCXX", "/opt/gcc/bin/g++")
    (libs / "libggml.so").write_bytes(static)
    hint = bs.failure_hint(bs.CUDA_FLAGS)
    assert hint.startswith(": libggml.so link libstdc++ statically (CXX=/opt/gcc/bin/g++ does that); libggml-cuda.so")
    assert hint.endswith("CC=gcc CXX=g++ CUDAHOSTCXX=g++ python scripts/build_llamacpp.py --rebuild"), hint
    # a CPU build's static libraries: CXX only, as before
    (libs / "libggml-cuda.so").unlink()
    hint = bs.failure_hint(bs.CPU_FLAGS)
    assert hint.startswith(": libggml.so link libstdc++ statically (CXX=/opt/gcc/bin/g++ does that), so each")
    assert (
        hint.endswith("the system's: CC=gcc CXX=g++ python scripts/build_llamacpp.py --rebuild") and "CUDA" not in hint
    )


def test_the_failed_smoke_check_hint_reads_the_build_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """main() hands the build's flags to the hint, so a -DCMAKE_CUDA_HOST_COMPILER in CMAKE_ARGS is what it names."""
    bs = build_script()
    _crashing_llama_cpp(tmp_path, monkeypatch)
    libs = tmp_path / "lib"
    libs.mkdir()
    (libs / "libggml-cuda.so").write_bytes(b"\x7fELF...libc.so.6\0_ZNSt7codecvtIDsc11__mbstate_tE10do_unshift")
    monkeypatch.setattr(bs, "_installed_lib_dir", lambda: libs)
    monkeypatch.setattr(bs, "install_wheel", lambda _: None)

    def no_build(*_: Any) -> Path:
        raise AssertionError("fetched or built despite the kept wheel")

    monkeypatch.setattr(bs, "fetch_sdist", no_build)
    monkeypatch.setattr(bs, "compiler_problem", no_build)
    monkeypatch.delenv("CUDAHOSTCXX", raising=False)
    cmake_args = f"{bs.CUDA_FLAGS} -DCMAKE_CUDA_HOST_COMPILER=/opt/gcc/bin/g++"  # portable: its key holds no CPU
    monkeypatch.setenv("CMAKE_ARGS", cmake_args)
    vdir = tmp_path / "llc" / "9.9.9"
    key = bs.cache_key(f"{cmake_args} {bs.FIXED_ARGS}", {})
    (vdir / "wheels" / key).mkdir(parents=True)
    (vdir / "wheels" / key / "llama_cpp_python-9.9.9-cp311-cp311-linux_x86_64.whl").write_bytes(b"")
    (vdir / "converter").mkdir()
    (vdir / "converter" / "convert_hf_to_gguf.py").write_text("# converter\n")
    monkeypatch.setattr(
        sys, "argv", ["build_llamacpp.py", "--version", "9.9.9", "--dir", str(tmp_path / "llc"), "--no-tools"]
    )
    with pytest.raises(SystemExit) as exc:
        bs.main()
    assert "with the CUDA host compiler, CMAKE_CUDA_HOST_COMPILER=/opt/gcc/bin/g++, which does that" in str(exc.value)
