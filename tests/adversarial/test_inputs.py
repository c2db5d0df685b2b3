"""Hostile and careless inputs (issue 12): each gets a one-line refusal with the right exit code, never a
traceback, and an artifact carries nothing machine-specific."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmopt.errors import EXIT_INPUT
from tests.helpers import SMOLLM2_CONFIG, fake_model, first_layers, run_cli

_CONFIG_PY = """
import pathlib
pathlib.Path({sentinel!r}).write_text("configuration imported")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "evilnet"
"""

_MODELING_PY = """
import pathlib
pathlib.Path({sentinel!r}).write_text("modeling imported")
from transformers import LlamaForCausalLM

from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def remote_code_folder(folder: Path, sentinels: Path, base: Path | None = None) -> Path:
    """A model folder whose config points (auto_map) at its own Python files; importing them writes sentinels.

    With ``base`` (a real model folder) the code subclasses Llama, so the model really loads once trusted."""
    if base is not None:
        first_layers(base, folder, 1)
        config = json.loads((folder / "config.json").read_text())
    else:
        fake_model(folder)
        config = dict(SMOLLM2_CONFIG)
    config.update(
        {
            "model_type": "evilnet",
            "architectures": ["EvilForCausalLM"],
            "auto_map": {
                "AutoConfig": "configuration_evil.EvilConfig",
                "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
            },
        }
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_evil.py").write_text(_CONFIG_PY.format(sentinel=str(sentinels / "configuration-ran")))
    (folder / "modeling_evil.py").write_text(_MODELING_PY.format(sentinel=str(sentinels / "modeling-ran")))
    return folder


def assert_refused(proc: Any, code: int = EXIT_INPUT) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]  # progress lines may come before it
    assert "  -> " in proc.stderr


@pytest.mark.parametrize("answer", ["y\n", "y\n" * 200, ""], ids=["echo-y", "yes", "empty-stdin"])
def test_remote_code_never_runs_without_the_flag(tmp_path: Path, answer: str) -> None:
    """`echo y | llmopt quantize fx/remote ...` imported the folder's configuration_*.py (and `yes |` its
    modeling_*.py): transformers asked on stdin because llmopt never passed trust_remote_code. Now the folder
    is refused (exit 2) before anything is imported, whatever stdin says."""
    (tmp_path / "fx").mkdir()
    remote_code_folder(tmp_path / "fx" / "remote", tmp_path)
    proc = run_cli(["quantize", "fx/remote", "-m", "bnb-int8", "-o", "o/x"], cwd=tmp_path, stdin=answer)
    assert_refused(proc)
    assert "--trust-remote-code" in proc.stderr and "configuration_evil.py" in proc.stderr
    assert not (tmp_path / "configuration-ran").exists()
    assert not (tmp_path / "modeling-ran").exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_remote_code_runs_only_with_the_flag_and_is_recorded(tmp_path: Path, assets: dict[str, Path]) -> None:
    """--trust-remote-code lets a real custom-code model quantize (bnb-int8) and the manifest says it was
    allowed; evaluating the artifact (which carries the code) without the flag is refused like the source."""
    (tmp_path / "fx").mkdir()
    remote_code_folder(tmp_path / "fx" / "remote", tmp_path, base=assets["model"])
    proc = run_cli(
        ["quantize", "fx/remote", "-m", "bnb-int8", "-o", "o/x", "--trust-remote-code", "-q"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "configuration-ran").exists()
    manifest = json.loads((tmp_path / "o" / "x" / "llmopt.json").read_text())
    assert manifest["options"]["_resolved"]["trust_remote_code"] is True

    (tmp_path / "configuration-ran").unlink()
    (tmp_path / "modeling-ran").unlink(missing_ok=True)
    text = assets["eval_text"]
    proc = run_cli(
        ["eval", "o/x", "--baseline", str(assets["model"]), "--dataset", str(text), "--max-tokens", "600"],
        cwd=tmp_path,
        stdin="y\n" * 50,
    )
    assert_refused(proc)
    assert "artifact" in proc.stderr and "--trust-remote-code" in proc.stderr
    assert not (tmp_path / "configuration-ran").exists()


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path]) -> dict[str, Path]:
    """A real bnb-int8 artifact of SmolLM2 cut to 1 decoder layer, and that cut (its baseline)."""
    from llmopt.api import quantize

    root = tmp_path_factory.mktemp("int8")
    model = first_layers(assets["model"], root / "model", 1)
    quantize(str(model), "bnb-int8", root / "art", device="cpu")
    return {"root": root, "model": model, "artifact": root / "art", "text": assets["eval_text"]}


@pytest.mark.parametrize(
    ("flags", "names", "not_named"),
    [
        (["--batch-size", "0"], "--batch-size 0", None),
        (["--batch-size", "-3"], "--batch-size -3", None),
        (["--context", "0"], "--context 0", "stride"),
        (["--context", "1"], "--context 1", "stride"),
        (["--context", "2", "--add-bos"], "--context 2", "stride"),
        (["--stride", "0"], "--stride 0", None),
        (["--context", "64", "--stride", "65"], "--stride 65", None),
        (["--max-tokens", "1"], "--max-tokens", None),
    ],
)
def test_eval_numeric_options_refused_before_loading(
    int8_artifact: dict[str, Path], flags: list[str], names: str, not_named: str | None
) -> None:
    """`eval --batch-size 0` ended in `ValueError: range() arg 3 must not be zero` (exit 1) after both models had
    loaded, and `--context 0` blamed the stride. Each bad number is now refused first, naming its own option."""
    root = int8_artifact["root"]
    proc = run_cli(
        ["eval", "art", "--baseline", "model", "--dataset", str(int8_artifact["text"]), "--device", "cpu", *flags],
        cwd=root,
    )
    assert_refused(proc)
    error = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert names in error
    if not_named:
        assert not_named not in error
    assert "loading" not in proc.stderr  # refused before any model was loaded


@pytest.mark.parametrize(
    ("flags", "names"), [(["--samples", "0"], "--samples 0"), (["--seq-len", "0"], "--seq-len 0")]
)
def test_quantize_calibration_sizes_refused_up_front(
    int8_artifact: dict[str, Path], flags: list[str], names: str
) -> None:
    """`quantize --samples 0` / `--seq-len 0` got one message for both ("at least 1 sample of at least 8 tokens")
    after the tokenizer was loaded; each is refused up front, naming the option."""
    root = int8_artifact["root"]
    proc = run_cli(
        ["quantize", "model", "-m", "gptq", "-o", "g", "--calibration", str(int8_artifact["text"]), *flags], cwd=root
    )
    assert_refused(proc)
    assert names in proc.stderr
    assert not (root / "g").exists()


def _raw_safetensors(path: Path, header: Any, data: bytes = b"\0" * 8) -> None:
    import struct

    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ([1, 2, 3], "header is a JSON list"),
        ({"w": "F16"}, "entry of tensor 'w' is a str"),
        ({"w": {"dtype": "F16", "shape": ["a"], "data_offsets": [0, 2]}}, "shape ['a']"),
        ({"w": {"dtype": "F16", "shape": [1.5], "data_offsets": [0, 2]}}, "shape [1.5]"),
        ({"w": {"dtype": "F16", "shape": [2]}}, "data_offsets None"),
        ({"w": {"dtype": "F16", "shape": [2], "data_offsets": "0-4"}}, "data_offsets '0-4'"),
        ({"w": {"shape": [2], "data_offsets": [0, 4]}}, "has no dtype"),
        ("just a string", "header is a JSON str"),
    ],
    ids=["list", "non-dict-entry", "str-shape", "float-shape", "no-offsets", "str-offsets", "no-dtype", "string"],
)
def test_made_up_safetensors_header_is_refused(tmp_path: Path, header: Any, says: str) -> None:
    """A made-up safetensors header (a JSON list, a non-dict entry, a non-integer shape) ended in exit 1 with a
    traceback from the header check; it is a corrupt model file: exit 2, one line naming what is wrong."""
    model = fake_model(tmp_path / "m")
    _raw_safetensors(model / "model.safetensors", header)
    proc = run_cli(["quantize", "m", "-m", "bnb-int8", "-o", "o"], cwd=tmp_path)
    assert_refused(proc)
    assert "model.safetensors is not a valid safetensors file" in proc.stderr and says in proc.stderr
    assert not (tmp_path / "o").exists()


class _Hostile:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> Any:
        return (exec, (f"open({str(self.sentinel)!r}, 'w').write('unpickled')",))


def test_pickle_only_checkpoint_is_refused_safely(tmp_path: Path) -> None:
    """A pickle-only pytorch_model.bin whose pickle names Python code: torch's weights_only loader refuses it,
    which surfaced as a traceback (exit 1). Now exit 2 saying so, and the pickle's code never runs."""
    import torch

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    sentinel = tmp_path / "pickle-ran"
    torch.save({"w": torch.zeros(4), "x": _Hostile(sentinel)}, model / "pytorch_model.bin")
    proc = run_cli(["quantize", "m", "-m", "bnb-int8", "-o", "o"], cwd=tmp_path)
    assert_refused(proc)
    assert "pytorch_model.bin is a pickle that torch's safe loader refuses" in proc.stderr
    assert "safetensors" in proc.stderr.split("  -> ")[-1]
    assert not sentinel.exists()
    assert not (tmp_path / "o").exists()


def test_tensor_only_pickle_checkpoint_still_opens(tmp_path: Path) -> None:
    """The pickle check refuses only what torch's safe loader refuses: a plain tensor .bin still opens."""
    import torch

    from llmopt.source import resolve

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    torch.save({"w": torch.zeros(4)}, model / "pytorch_model.bin")
    assert [p.name for p in resolve(str(model)).weight_files] == ["pytorch_model.bin"]


@pytest.mark.parametrize("model_type", ["foonet", "llamma", None])
def test_unknown_architecture_is_refused(tmp_path: Path, model_type: str | None) -> None:
    """An architecture transformers does not know ended in a traceback from inside transformers (exit 1);
    it is refused before loading, with exit 2 (and a close name when there is one)."""
    config = {**SMOLLM2_CONFIG, "architectures": ["FooNetForCausalLM"]}
    if model_type:
        config["model_type"] = model_type
    else:
        config.pop("model_type")
    fake_model(tmp_path / "m", config)
    proc = run_cli(["quantize", "m", "-m", "bnb-int8", "-o", "o"], cwd=tmp_path)
    assert_refused(proc)
    assert "which this version of transformers does not know" in proc.stderr
    if model_type == "llamma":
        assert "Did you mean 'llama'?" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("method", "size"), [("gptq", "0"), ("gptq", "-2"), ("awq", "0"), ("awq", "256")])
def test_bad_group_size_suggests_only_sizes_that_divide(tmp_path: Path, method: str, size: str) -> None:
    """`--group-size 0` suggested 128, which does not divide SmolLM2's 576-wide layers: the hint names only
    sizes that divide every layer of this model (32, 64) and -1."""
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-m", method, "-o", "o", "--group-size", size, "--calibration", "x"], cwd=tmp_path)
    assert_refused(proc)
    hint = proc.stderr.split("  -> ")[-1]
    assert "32" in hint and "64" in hint and "-1" in hint
    assert "128" not in hint and "256" not in hint


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-m", "bnb-nf4", "--double-quant", "-O", "double_quant=false"], "--double-quant and -O double_quant=false"),
        (["-m", "bnb-nf4", "--no-double-quant", "-O", "double-quant=true"], "--no-double-quant and -O"),
        (["-m", "bnb-nf4", "--compute-dtype", "float16", "-O", "compute_dtype=float32"], "--compute-dtype float16"),
        (["-m", "gptq", "--bits", "4", "-O", "bits=8"], "--bits 4 and -O bits=8"),
        (["-m", "gptq", "-O", "bits=4", "-O", "bits=8"], "-O bits=4 and -O bits=8"),
        (["-m", "awq", "--version", "gemm", "-O", "version=gemv"], "--version gemm and -O version=gemv"),
    ],
)
def test_flag_and_option_conflicts_are_refused(tmp_path: Path, args: list[str], says: str) -> None:
    """`--double-quant` together with `-O double_quant=false` resolved silently to the last one: every typed flag
    against its -O key (and one -O key given twice) that disagree is refused."""
    fake_model(tmp_path / "m")
    proc = run_cli(["quantize", "m", "-o", "o", *args], cwd=tmp_path)
    assert_refused(proc)
    assert says in proc.stderr and "different values" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_flag_and_option_that_agree_are_one_option() -> None:
    """The same value given as a flag and as -O is no conflict."""
    from llmopt.cli.quantize import merge_options

    flags = {"double_quant": True, "bits": 4, "group_size": None}
    assert merge_options(flags, ["double_quant=true", "bits=4", "group_size=64"]) == {
        "double_quant": True,
        "bits": 4,
        "group_size": 64,
    }


def _machine_free(folder: Path) -> dict[str, bytes]:
    """Every model file (the manifest aside), after checking none names a temporary folder."""
    import tempfile

    temp = str(Path(tempfile.gettempdir()).resolve())
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "llmopt.json"}
    for name, blob in files.items():
        if name.endswith((".json", ".csv")):
            text = blob.decode()
            assert "offload_to_disk_path" not in text, name
            assert temp not in text, name
    return files


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_artifacts_carry_nothing_machine_specific(tmp_path: Path, assets: dict[str, Path], method: str) -> None:
    """GPTQ (and AWQ) artifacts' config.json / quantize_config.json carried GPTQModel's temporary
    `offload_to_disk_path`, and quant_log.csv per-module timings in thread order, so two runs never gave
    byte-identical artifacts. Now two runs give the same bytes, and the artifact still loads."""
    from llmopt.api import quantize
    from llmopt.runners.hf import HFRunner

    model = first_layers(assets["model"], tmp_path / "m", 1)
    runs = 2 if method == "gptq" else 1  # AWQ on CPU is slow (emulated fp16): one run, checked for paths
    outs = []
    for i in range(runs):
        out = tmp_path / f"{method}{i}"
        quantize(
            str(model),
            method,
            out,
            options={"group_size": 64},
            calibration=str(assets["calibration_text"]),
            samples=2,
            seq_len=32,
            device="cpu",
        )
        outs.append(_machine_free(out))
    if runs == 2:
        assert outs[0] == outs[1]
    log = outs[0]["quant_log.csv"].decode().splitlines()
    assert log[0].split(",")[:3] == ["layer", "module", "loss"] and "time" not in log[0].split(",")
    runner = HFRunner(tmp_path / f"{method}0", "cpu", loader="gptqmodel")
    try:
        nll = runner.nll([list(range(100, 132))], [1])
        assert len(nll[0]) == 31 and all(v == v for v in nll[0])
    finally:
        runner.close()


def _worker_busy_while_main_waits(pid: int) -> bool:
    """From /proc: the main thread sleeps while another thread of the process runs (a GPTQModel worker
    inside torch), the moment at which an interrupt used to end in an abort."""
    tasks = Path(f"/proc/{pid}/task")
    try:
        states = {int(t.name): (t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()}
    except (OSError, IndexError, ValueError):
        return False
    return states.get(pid) == "S" and any(s == "R" for tid, s in states.items() if tid != pid)


def _gptq_run(
    tmp_path: Path, out: str, interrupt_after: float | None, *, wait_for_busy_worker: bool = True
) -> tuple[int, str, float]:
    """Quantize the 4-layer cut with GPTQ as a real process; with ``interrupt_after``, SIGINT that many seconds
    into the GPTQ step, at a moment a worker thread runs while the main thread waits. Returns the exit code
    (-1: it finished before it could be interrupted), stderr and the seconds the GPTQ step took (0 when it did
    not finish)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_WAIT_POLICY": "passive"}
    args = ["quantize", "m", "-m", "gptq", "-o", out, "--group-size", "64", "--calibration", "calib.txt",
            "--samples", "32", "--seq-len", "256", "--device", "cpu"]  # fmt: skip
    err_path = tmp_path / f"{out}.err"
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llmopt", *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err_file
        )
        try:
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None and "GPTQ 4-bit" not in err_path.read_text():
                time.sleep(0.05)
            started = time.time()
            if interrupt_after is not None:
                time.sleep(interrupt_after)
                while (
                    wait_for_busy_worker
                    and time.time() < deadline
                    and proc.poll() is None
                    and not _worker_busy_while_main_waits(proc.pid)
                ):
                    time.sleep(0.01)
                if proc.poll() is not None:
                    return -1, err_path.read_text(), 0.0  # finished before it could be interrupted
                proc.send_signal(signal.SIGINT)
            gptq_seconds = None
            while time.time() < deadline and proc.poll() is None:
                if gptq_seconds is None and "saving GPTQ checkpoint" in err_path.read_text():
                    gptq_seconds = time.time() - started
                time.sleep(0.05)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, err_path.read_text(), gptq_seconds or 0.0


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to see the worker threads")
def test_sigint_mid_gptq_exits_130_cleanly(tmp_path: Path, assets: dict[str, Path]) -> None:
    """Ctrl-C during GPTQ quantize printed 'interrupted', removed staging, then aborted (exit 134, "terminate
    called without an active exception"): GPTQModel's daemon worker threads were still inside torch (packing
    the last layer) when the interpreter finalized. A SIGINT late in the GPTQ step, while a worker runs, now
    exits 130 with no abort and nothing left behind."""
    import shutil
    import signal

    first_layers(assets["model"], tmp_path / "m", 4)
    shutil.copy(assets["calibration_text"], tmp_path / "calib.txt")
    code, err, gptq_seconds = _gptq_run(tmp_path, "full", None)  # how long the GPTQ step takes on this machine
    assert code == 0, err[-3000:]
    assert gptq_seconds > 0
    # Late in the GPTQ step (the last layer's packing) is where the abort happened; a machine that got faster
    # meanwhile may finish first: then try a little earlier.
    for fraction in (0.95, 0.9, 0.8, 0.7):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        code, err, _ = _gptq_run(tmp_path, "out", fraction * gptq_seconds)
        # Too late: finished first, or the signal came once the artifact was complete and Python was already
        # finalizing (default SIGINT disposition again: killed by the signal, which is fine then).
        too_late = code == -1 or (code == -signal.SIGINT and (tmp_path / "out" / "llmopt.json").is_file())
        if not too_late:
            break
    else:
        # On a loaded machine no try met a worker busy while the main thread waited before the step ended: interrupt
        # mid-step without waiting for that moment (the deterministic test above covers the busy-worker mechanism).
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        code, err, _ = _gptq_run(tmp_path, "out", 0.5 * gptq_seconds, wait_for_busy_worker=False)
    assert code == 130, err[-3000:]
    assert "interrupted: nothing was written" in err
    assert "terminate called" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def _bnb_cpu_dtypes(path: Path) -> tuple[Any, set[str], set[str]]:
    """(runner.compute, dtypes of unquantized float params, dtypes entering/leaving the quantized layers)."""
    import torch

    from llmopt.runners.hf import HFRunner

    runner = HFRunner(path, "cpu")
    try:
        params = {
            str(p.dtype)
            for p in runner.model.parameters()
            if type(p).__name__ not in ("Int8Params", "Params4bit") and p.is_floating_point()
        }
        seen: set[str] = set()
        hooks = [
            m.register_forward_hook(lambda _m, i, o: seen.update({str(i[0].dtype), str(o.dtype)}))
            for m in runner.model.modules()
            # scoring replaces 4-bit layers by dense float32 Linears (bitsandbytes' dequantized weights)
            if type(m).__name__ in ("Linear8bitLt", "Linear4bit", "Linear")
        ]
        with torch.no_grad():
            runner.model(input_ids=torch.arange(100, 132).unsqueeze(0))
        for h in hooks:
            h.remove()
        return runner.compute, params, seen
    finally:
        runner.close()


def test_bnb_int8_on_cpu_computes_in_the_float32_it_reports(int8_artifact: dict[str, Path]) -> None:
    """'float32' was printed for bitsandbytes evaluations while transformers kept their unquantized weights in
    float16, so the whole forward ran in float16 (CPU-dependent rounding: +1.77% on one CPU, +2.21% on another).
    Now the unquantized tensors and activations are float32, and the runner says what the int8 matmul does."""
    compute, params, seen = _bnb_cpu_dtypes(int8_artifact["artifact"])
    assert params == {"torch.float32"}
    assert seen == {"torch.float32"}
    assert compute is not None and compute["unquantized"] == "float32" and "int8" in compute["matmul"]


def test_eval_report_records_each_sides_compute(int8_artifact: dict[str, Path]) -> None:
    """The report keeps per side what was computed in (the baseline's dtype was dropped, the artifact's moved)."""
    from llmopt.api import evaluate

    report = evaluate(
        int8_artifact["artifact"],
        str(int8_artifact["model"]),
        str(int8_artifact["text"]),
        context_length=64,
        max_tokens=200,
        device="cpu",
        use_cache=False,
        write_manifest=False,
    )
    assert report["settings"]["dtype"] == "float32"
    assert report["baseline"]["dtype"] == "float32" and report["artifact"]["dtype"] == "float32"
    assert report["artifact"]["compute"]["unquantized"] == "float32"
    assert "LLM.int8()" in report["artifact"]["compute"]["matmul"]


def test_nf4_made_on_cpu_stores_float16_compute_and_scores_in_float32(
    int8_artifact: dict[str, Path], tmp_path: Path
) -> None:
    """NF4 made on CPU stored `bnb_4bit_compute_dtype: float32`, so GPU users got float32 matmuls: the checkpoint
    now stores float16 (what a GPU user wants), and llmopt's CPU runner still computes in float32."""
    from llmopt.api import quantize

    quantize(str(int8_artifact["model"]), "bnb-nf4", tmp_path / "nf4", device="cpu")
    qcfg = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert qcfg["bnb_4bit_compute_dtype"] == "float16"
    compute, params, seen = _bnb_cpu_dtypes(tmp_path / "nf4")
    assert params == {"torch.float32"} and seen == {"torch.float32"}
    assert compute is not None and "float32 matmul" in compute["matmul"]


def test_recipe_refuses_remote_code_unless_its_key_allows_it(tmp_path: Path, assets: dict[str, Path]) -> None:
    """`llmopt run` on a recipe whose model has its own code: refused (exit 2, nothing imported) unless the
    recipe says `model.trust_remote_code: true`; then the variant is quantized and its manifest records it."""
    (tmp_path / "fx").mkdir()
    remote_code_folder(tmp_path / "fx" / "remote", tmp_path, base=assets["model"])
    recipe = f"""\
name: remote
model:
  source: fx/remote
evaluation:
  dataset: {assets["eval_text"]}
  context_length: 64
  max_tokens: 200
  device: cpu
variants:
  - name: int8
    method: bnb-int8
"""
    (tmp_path / "r.yaml").write_text(recipe)
    proc = run_cli(["run", "r.yaml", "-o", "runs"], cwd=tmp_path, stdin="y\n" * 50)
    assert_refused(proc)
    assert "model.trust_remote_code: true" in proc.stderr
    assert not (tmp_path / "configuration-ran").exists()

    trusted = recipe.replace("  source: fx/remote\n", "  source: fx/remote\n  trust_remote_code: true\n")
    (tmp_path / "r.yaml").write_text(trusted)
    proc = run_cli(["run", "r.yaml", "-o", "runs", "-q"], cwd=tmp_path)
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    manifests = list((tmp_path / "runs").rglob("llmopt.json"))
    assert manifests and json.loads(manifests[0].read_text())["options"]["_resolved"]["trust_remote_code"] is True


_BUSY_THREADS_THEN_SIGINT = """
import os, signal, sys, threading, time
import torch

def work():  # what GPTQModel's daemon workers do: torch ops, back to back
    a = torch.randn(400, 400)
    while True:
        torch.linalg.cholesky(a @ a.T + 400 * torch.eye(400))

for _ in range(2):
    threading.Thread(target=work, daemon=True).start()
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
sys.argv = ["llmopt", "eval", "art", "--baseline", "model", "--dataset", sys.argv[1], "--device", "cpu", "--no-cache"]
from llmopt.cli.main import main
main()
"""


def test_interrupt_with_busy_daemon_threads_exits_130(int8_artifact: dict[str, Path]) -> None:
    """The mechanism behind the GPTQ abort, made deterministic: daemon threads inside torch when an interrupted
    run exits were ended by the interpreter's finalization mid-op ("terminate called without an active
    exception", SIGABRT). An interrupted CLI run now exits 130 cleanly whatever other threads are doing."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", _BUSY_THREADS_THEN_SIGINT, str(int8_artifact["text"])],
            cwd=int8_artifact["root"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert "interrupted" in proc.stderr and "terminate called" not in proc.stderr


# --- a model folder without a tokenizer ---------------------------------------------------------------------


def _without_tokenizer(assets: dict[str, Path], folder: Path) -> Path:
    """The real SmolLM2 cut to one layer, its tokenizer files removed (a folder saved with model.save_pretrained
    only, as people do)."""
    model = first_layers(assets["model"], folder, 1)
    for p in model.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
            p.unlink()
    return model


@pytest.mark.parametrize("method", ["bnb-int8", "gptq"])
def test_quantize_without_a_tokenizer_is_refused_before_work(
    tmp_path: Path, assets: dict[str, Path], method: str
) -> None:
    """Old code: bnb-int8 quantized, then died with a transformers traceback (exit 1) saving the tokenizer;
    GPTQ with calibration died the same way while preparing calibration."""
    model = _without_tokenizer(assets, tmp_path / "model")
    args = ["quantize", "model", "-m", method, "-o", "out"]
    if method == "gptq":
        calib = str(assets["calibration_text"])
        args += ["--calibration", calib, "--group-size", "64", "--samples", "4", "--seq-len", "64"]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "has no tokenizer" in r.stderr and "Traceback" not in r.stderr
    assert "loading and quantizing" not in r.stderr  # refused before any work
    assert not (tmp_path / "out").exists()
    assert model.exists()


def test_eval_against_a_baseline_without_a_tokenizer_is_refused(tmp_path: Path, assets: dict[str, Path]) -> None:
    model = first_layers(assets["model"], tmp_path / "model", 1)
    assert run_cli(["quantize", "model", "-m", "bnb-int8", "-o", "art"], cwd=tmp_path).returncode == 0
    bare = _without_tokenizer(assets, tmp_path / "bare")
    r = run_cli(["eval", "art", "--baseline", bare.name, "--dataset", str(assets["eval_text"]), "--max-tokens", "256"],
                cwd=tmp_path)  # fmt: skip
    assert r.returncode == EXIT_INPUT, r.stderr[-2000:]
    assert "baseline model folder" in r.stderr and "has no tokenizer" in r.stderr and "Traceback" not in r.stderr
    assert model.exists()
