"""Device resolution and multi-GPU placement: the pure logic on CPU (fake GPU ids), GPU paths behind a marker."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from llmopt import placement as pl
from llmopt.errors import EXIT_INPUT, EXIT_UNAVAILABLE, BackendUnavailableError, InputError
from llmopt.placement import DeviceTarget, Placement, balanced_assignment, parse_device, plan_placement
from tests.helpers import fake_model, random_models

ROOT = Path(__file__).resolve().parents[1]
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="needs torch + transformers (pip install -e '.[all,test]')",
)


# --- --device -> DeviceTarget ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "gpus", "mode", "ids"),
    [
        ("cpu", 2, "cpu", ()),
        ("auto", 0, "cpu", ()),
        ("auto", 1, "single", (0,)),
        ("auto", 2, "fit", (0, 1)),
        ("cuda", 1, "single", (0,)),
        ("cuda", 3, "balanced", (0, 1, 2)),
        ("cuda:1", 2, "single", (1,)),
        ("CUDA:0, 1", 2, "balanced", (0, 1)),
        ("cuda:2,0", 3, "balanced", (2, 0)),
    ],
)
def test_device_values(spec: str, gpus: int, mode: str, ids: tuple[int, ...]) -> None:
    target = parse_device(spec, gpus)
    assert (target.mode, target.gpus) == (mode, ids)
    # the canonical spec resolves to the same target again
    assert parse_device(target.spec, gpus) == target
    assert target.primary == (f"cuda:{ids[0]}" if ids else "cpu")
    assert target.multi_gpu == (len(ids) > 1)


def test_gpu_that_does_not_exist_is_bad_input() -> None:
    with pytest.raises(InputError) as exc:
        parse_device("cuda:3", 2)
    assert exc.value.exit_code == EXIT_INPUT
    assert "only 2 GPU(s) are visible here (cuda:0, cuda:1)" in exc.value.message


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:0,1"])
def test_gpu_without_cuda_is_unavailable(spec: str) -> None:
    with pytest.raises(BackendUnavailableError) as exc:
        parse_device(spec, 0)
    assert exc.value.exit_code == EXIT_UNAVAILABLE


@pytest.mark.parametrize("spec", ["gpu0", "cuda:", "cuda:a", "cuda:0,0", "mps:0", "cuda:0;1"])
def test_malformed_devices_are_bad_input(spec: str) -> None:
    with pytest.raises(InputError) as exc:
        parse_device(spec, 2)
    assert exc.value.exit_code == EXIT_INPUT


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from llmopt.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return (exc.value.code if isinstance(exc.value.code, int) else 1), out, err


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_cli_names_the_visible_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pl, "visible_gpu_count", lambda: 2)
    args = ["quantize", str(fake_model(tmp_path / "m")), "-m", "bnb-int8", "-o", str(tmp_path / "o")]
    code, _, err = run_cli([*args, "--device", "cuda:3"], capsys)
    assert code == EXIT_INPUT
    assert err.startswith("error: ") and "only 2 GPU(s) are visible" in err and "  -> " in err
    code, _, err = run_cli([*args, "--device", "gpu0"], capsys)
    assert code == EXIT_INPUT and "is not a device llmopt knows" in err
    assert not (tmp_path / "o").exists()


def test_help_documents_the_devices(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["eval", "--help"], capsys)
    assert code == 0
    text = " ".join(out.replace("│", " ").split())  # rich draws the help in a box
    for word in ("cuda:N", "cuda:0,1", "every visible GPU"):
        assert word in text


# --- the balanced split ----------------------------------------------------------------------------


def _brute_force(sizes: list[int], parts: int) -> int:
    best = sum(sizes)
    for cuts in itertools.combinations(range(1, len(sizes)), parts - 1):
        bounds = [0, *cuts, len(sizes)]
        best = min(best, max(sum(sizes[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize(
    ("sizes", "parts"),
    [([1, 1, 1, 1], 2), ([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2), ([5, 3, 3, 3, 3, 3, 0, 0], 3), ([2, 7], 4)],
)
def test_balanced_assignment_is_contiguous_and_optimal(sizes: list[int], parts: int) -> None:
    out = balanced_assignment(sizes, parts)
    used = min(parts, len(sizes))
    assert out[0] == 0 and out == sorted(out)  # contiguous runs in order
    assert set(out) == set(range(used))  # no GPU left empty
    load = [sum(s for s, a in zip(sizes, out, strict=True) if a == k) for k in range(used)]
    assert max(load) == _brute_force(sizes, used)


def test_balanced_assignment_random_against_brute_force() -> None:
    import random

    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(0, 20) for _ in range(rng.randint(1, 9))]
        parts = rng.randint(1, 4)
        out = balanced_assignment(sizes, parts)
        used = min(parts, len(sizes))
        load = [sum(s for s, a in zip(sizes, out, strict=True) if a == k) for k in range(used)]
        assert max(load) == _brute_force(sizes, used), (sizes, parts, out)


# --- planning on real model classes (meta device: no weights) ---------------------------------------


def tiny_config(folder: Path, *, layers: int = 6, tied: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": layers,
        "vocab_size": 512,
        "tie_word_embeddings": tied,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def check_covers_every_tensor(model: Any, device_map: dict[str, str]) -> None:
    """accelerate's own check that a device_map places every parameter and buffer (raises if not)."""
    from accelerate.utils.modeling import check_device_map

    check_device_map(model, device_map)
    for name, _ in [*model.named_parameters(), *model.named_buffers()]:
        owners = [k for k in device_map if name == k or name.startswith(k + ".")]
        assert len(owners) == 1, (name, owners)


@needs_torch
@pytest.mark.parametrize("tied", [True, False])
def test_balanced_plan_splits_layers_and_keeps_tied_head_with_embedding(tmp_path: Path, tied: bool) -> None:
    folder = tiny_config(tmp_path / "m", layers=6, tied=tied)
    p = plan_placement(DeviceTarget("balanced", (0, 1)), folder)
    assert p.mode == "split" and p.devices == ["cuda:0", "cuda:1"]
    assert p.device_map is not None
    check_covers_every_tensor(pl.meta_model(folder), p.device_map)
    assert p.device_map["model.embed_tokens"] == "cuda:0"
    assert p.device_map["lm_head"] == ("cuda:0" if tied else "cuda:1")
    assert sum(p.layers_per_device.values()) == 6 and all(n > 0 for n in p.layers_per_device.values())
    # layers keep their order: every layer on cuda:0 comes before every layer on cuda:1
    order = [p.device_map[f"model.layers.{i}"] for i in range(6)]
    assert order == sorted(order)
    # balanced by bytes: the two GPUs differ by at most one decoder layer's bytes
    units = pl.model_units(pl.meta_model(folder))
    layer_bytes = max(u.size for u in units if u.is_layer)
    loads = list(p.bytes_per_device.values())
    assert abs(loads[0] - loads[1]) <= layer_bytes
    record = p.record()
    assert set(record) == {"mode", "requested", "devices", "layers_per_device", "bytes_per_device", "reason"}
    assert record["requested"] == "cuda:0,1"
    json.dumps(record)  # goes into JSON reports as is


@needs_torch
def test_auto_keeps_a_model_that_fits_on_gpu_0(tmp_path: Path) -> None:
    folder = tiny_config(tmp_path / "m")
    total = sum(u.size for u in pl.model_units(pl.meta_model(folder)))
    target = parse_device("auto", 2)
    fits = plan_placement(target, folder, free_memory={0: int(total / pl.FIT_FRACTION) + 1})
    assert (fits.mode, fits.devices, fits.device_map) == ("single", ["cuda:0"], None)
    assert fits.transformers_device_map() == {"": "cuda:0"}
    assert "fit" in fits.reason
    split = plan_placement(target, folder, free_memory={0: total})
    assert split.mode == "split" and split.devices == ["cuda:0", "cuda:1"]
    assert "exceed" in split.reason


def test_cpu_and_one_gpu_need_no_model(tmp_path: Path) -> None:
    # no config.json there: nothing is read for these
    assert plan_placement(DeviceTarget("cpu"), tmp_path).transformers_device_map() == "cpu"
    one = plan_placement(DeviceTarget("single", (1,)), tmp_path)
    assert one.transformers_device_map() == {"": "cuda:1"} and one.spec == "cuda:1"
    split = Placement("split", ["cuda:0", "cuda:2"], {"a": "cuda:0", "b": "cuda:2"})
    assert split.spec == "cuda:0,2"


@needs_torch
def test_sizes_come_from_the_checkpoint_header(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder = tiny_config(tmp_path / "m", layers=2)
    save_file(
        {
            "model.layers.0.self_attn.q_proj.qweight": torch.zeros(8, 64, dtype=torch.int32),
            "model.layers.0.self_attn.q_proj.scales": torch.zeros(1, 64, dtype=torch.float32),
            "model.embed_tokens.weight": torch.zeros(512, 64, dtype=torch.float16),
        },
        str(folder / "model.safetensors"),
    )
    sizes = pl.safetensors_bytes(folder, dtype_bytes=2)
    assert sizes["model.layers.0.self_attn.q_proj.qweight"] == 8 * 64 * 4  # integers as stored
    assert sizes["model.layers.0.self_attn.q_proj.scales"] == 64 * 2  # fp32 counted at the load dtype
    units = {u.name: u for u in pl.model_units(pl.meta_model(folder), 2, sizes)}
    assert units["model.layers.0"].size == 8 * 64 * 4 + 64 * 2  # from the checkpoint
    assert units["model.layers.1"].size > units["model.layers.0"].size  # not in it: from the model
    assert units["lm_head"].size == 0 and units["lm_head"].tied_to == "model.embed_tokens"


@needs_torch
def test_planned_map_loads_with_transformers(tmp_path: Path) -> None:
    """The unit names are keys transformers accepts (here every unit is sent to the CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tiny_config(tmp_path / "m", layers=4, tied=False)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    model.save_pretrained(folder)
    plan = plan_placement(DeviceTarget("balanced", (0, 1)), folder)
    assert plan.device_map is not None
    cpu_map = dict.fromkeys(plan.device_map, "cpu")
    loaded = AutoModelForCausalLM.from_pretrained(folder, device_map=cpu_map, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert pl.observed_layers(loaded) == {"cpu": 4}


# --- reports record the placement -------------------------------------------------------------------


@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_eval_json_and_manifest_record_the_placement(tmp_path: Path) -> None:
    import torch

    from llmopt.api import evaluate, quantize

    rm = random_models()
    folder = rm.save_fp16(rm.build_fp16(rm.llama_config("tiny"), "cpu").to(torch.float32), tmp_path / "model")
    art = quantize(str(folder), "bnb-int8", tmp_path / "int8", device="cpu")
    assert art.manifest.environment.placement is not None
    assert art.manifest.environment.placement["mode"] == "cpu"
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 400 + 3}" for i in range(200)))
    report = evaluate(art.path, str(folder), str(text), context_length=32, device="cpu", use_cache=False)
    assert report["settings"]["placement"] == "cpu"
    for side in ("baseline", "artifact"):
        assert report[side]["placement"]["mode"] == "cpu"
        assert report[side]["placement"]["devices"] == ["cpu"]
    json.dumps(report.to_json())  # an EvalReport; to_json() is its JSON


# --- GPU (the GPU machine, two GPUs or more: pytest -m gpu tests/test_placement.py) -----------------


@pytest.fixture
def two_gpus() -> None:
    """Skips before the assets are looked for: a one-GPU machine without prepared assets skips, not errors."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs at least two GPUs")


@pytest.mark.gpu
def test_split_over_two_gpus_scores_like_one(two_gpus: None, assets: dict[str, Path]) -> None:
    from llmopt.runners.hf import HFRunner

    windows = [list(range(100, 164)), list(range(300, 364))]
    one = HFRunner(assets["model"], "cuda:0")
    try:
        expected = one.nll(windows, [1, 1])
    finally:
        one.close()
    split = HFRunner(assets["model"], "cuda:0,1")
    try:
        assert split.placement.mode == "split"
        assert set(split.placement.layers_per_device) == {"cuda:0", "cuda:1"}
        assert all(n > 0 for n in split.placement.layers_per_device.values())
        got = split.nll(windows, [1, 1])
    finally:
        split.close()
    for a, b in zip(got, expected, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3


@pytest.mark.gpu
def test_split_model_throughput_decodes_eagerly(two_gpus: None, assets: dict[str, Path]) -> None:
    from llmopt.evaluate.throughput import ThroughputSettings
    from llmopt.runners.hf import HFRunner

    settings = ThroughputSettings(batch_sizes=[1, 2], prompt_lens=[16], gen_len=4, warmup=0, repetitions=1)
    runner = HFRunner(assets["model"], "cuda:0,1")
    try:
        result = runner.bench(settings)
    finally:
        runner.close()
    assert result["decode_mode"] == "eager-static"
    assert "split over cuda:0,1" in result["decode_mode_note"]
    assert result["decode"]["1"]["tokens_per_s"]["median"] > 0
    assert result["roofline"]["note"]


@needs_torch
def test_observed_bytes_counts_a_tied_weight_once() -> None:
    import torch

    rm = random_models()
    model = rm.build_fp16(rm.llama_config("tiny", tie_word_embeddings=True), "cpu")
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    expected = sum(t.numel() * t.element_size() for t in unique.values())
    assert pl.observed_bytes(model) == {"cpu": expected}
    model.model.layers[0].to(torch.float32)  # element sizes are read per tensor
    assert pl.observed_bytes(model)["cpu"] > expected
