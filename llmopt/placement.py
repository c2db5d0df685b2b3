"""Where a model goes: the CPU, one GPU, or its layers split over several GPUs.

``--device`` says which devices a job may use (``DeviceTarget``); ``plan_placement`` then decides, for
one model folder, where each of its blocks goes (``Placement``), as an accelerate ``device_map`` that
transformers and GPTQModel load with. The values of ``--device``:

=============  ==========================================================================================
``cpu``        the CPU (unchanged: the whole model in host memory).
``cuda:N``     exactly GPU N, the whole model on it.
``cuda:N,M``   layers split over exactly those GPUs, balanced by weight bytes.
``cuda``       every visible GPU: layers split over all of them, balanced by weight bytes (one GPU: on it).
``auto``       no GPU: the CPU. One GPU: on it. Several: GPU 0 alone when the model's weights take at most
               ``FIT_FRACTION`` of its free memory (faster: no hops between GPUs, CUDA graphs work), else as
               ``cuda``. This is the default.
=============  ==========================================================================================

A split is a pipeline: each GPU holds a contiguous run of decoder layers (the input embedding on the
first, the final norm and output head on the last, a head tied to the embedding stays with it), and the
layers run one GPU after another. Perplexity does not depend on it (the same kernels compute the same
numbers); speed does (hops between GPUs, no CUDA graph across devices).

Nothing here imports torch at module level; planning needs torch + transformers (a meta-device model
built from config.json: no weights are read, only the safetensors headers for sizes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmopt.errors import BackendUnavailableError, InputError
from llmopt.source import safetensors_header

# `auto` keeps a model on GPU 0 when its weights take at most this share of the GPU's free memory; the
# rest is left for activations, the KV cache and the CUDA context.
FIT_FRACTION = 0.8

TargetMode = Literal["cpu", "single", "fit", "balanced"]

_DEVICE_HINT = (
    "Use --device auto, cpu, cuda (every visible GPU), cuda:N (one GPU) or cuda:N,M (layers split over those GPUs)."
)


@dataclass(frozen=True)
class DeviceTarget:
    """What ``--device`` allows, resolved against the GPUs visible here (before looking at a model)."""

    mode: TargetMode
    gpus: tuple[int, ...] = ()  # GPU indices; empty for the CPU

    @property
    def primary(self) -> str:
        """The first device: where a model that is not split goes, and where input ids start."""
        return f"cuda:{self.gpus[0]}" if self.gpus else "cpu"

    @property
    def spec(self) -> str:
        """Canonical ``--device`` value that resolves to this target again (on the same machine)."""
        if self.mode == "cpu":
            return "cpu"
        if self.mode == "single":
            return self.primary
        if self.mode == "fit":
            return "auto"
        return "cuda:" + ",".join(str(g) for g in self.gpus)

    @property
    def multi_gpu(self) -> bool:
        """True when a model may end up split over several GPUs."""
        return len(self.gpus) > 1

    def describe(self) -> str:
        if self.mode == "cpu":
            return "cpu"
        if self.mode == "single":
            return self.primary
        devices = ",".join(f"cuda:{g}" for g in self.gpus)
        if self.mode == "fit":
            return f"auto: cuda:{self.gpus[0]} if the model fits, else split over {devices}"
        return f"split over {devices}"


_CUDA_RE = re.compile(r"^cuda(?::(\d+(?:\s*,\s*\d+)*))?$")


def parse_device(device: str, gpu_count: int) -> DeviceTarget:
    """``--device`` -> ``DeviceTarget``, given how many CUDA GPUs are visible. Pure (no torch).

    Raises InputError (exit 2) for a malformed value or a GPU that does not exist here, and
    BackendUnavailableError (exit 4) when a GPU is asked for and none is visible.
    """
    text = device.strip().lower()
    if text == "cpu":
        return DeviceTarget("cpu")
    if text == "auto":
        if gpu_count <= 0:
            return DeviceTarget("cpu")
        if gpu_count == 1:
            return DeviceTarget("single", (0,))
        return DeviceTarget("fit", tuple(range(gpu_count)))
    match = _CUDA_RE.match(text)
    if not match:
        raise InputError(f"'{device}' is not a device llmopt knows.", _DEVICE_HINT)
    if gpu_count <= 0:
        raise BackendUnavailableError(
            f"device '{device}' was asked for, but no CUDA GPU is visible.",
            "Use --device cpu, or run on a machine with a GPU.",
        )
    if match.group(1) is None:
        gpus = tuple(range(gpu_count))
        return DeviceTarget("single" if gpu_count == 1 else "balanced", gpus)
    ids = [int(x) for x in match.group(1).split(",")]
    if len(set(ids)) != len(ids):
        raise InputError(f"device '{device}' names a GPU twice.", _DEVICE_HINT)
    missing = [i for i in ids if i >= gpu_count]
    if missing:
        visible = ", ".join(f"cuda:{i}" for i in range(gpu_count))
        raise InputError(
            f"device '{device}' names GPU {missing[0]}, but only {gpu_count} GPU(s) are visible here ({visible}).",
            "Pick a GPU from that list (CUDA_VISIBLE_DEVICES renumbers GPUs from 0), or use --device cuda for all.",
        )
    return DeviceTarget("single" if len(ids) == 1 else "balanced", tuple(ids))


def visible_gpu_count() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def resolve_target(device: str) -> DeviceTarget:
    """``--device`` -> ``DeviceTarget`` on this machine (imports torch only when a GPU may be involved)."""
    if device.strip().lower() == "cpu":
        return DeviceTarget("cpu")
    return parse_device(device, visible_gpu_count())


# ---------------------------------------------------------------------------------------------------
# Planning: which block of a model goes where


@dataclass
class Unit:
    """A block placed as a whole: a decoder layer, the embedding, the final norm, the output head."""

    name: str  # module path, a key of the device_map ("model.layers.3", "lm_head")
    size: int  # bytes it adds on its device (0 for a weight tied to an earlier unit)
    is_layer: bool  # a repeated decoder block
    tied_to: str | None = None  # another unit it shares a weight with: must go to the same device


@dataclass
class Placement:
    """Where one model was (or will be) put. ``record()`` is what reports and manifests keep."""

    mode: Literal["cpu", "single", "split"]
    devices: list[str]
    device_map: dict[str, str] | None = None  # unit -> device; None when the model is on one device
    bytes_per_device: dict[str, int] = field(default_factory=dict)
    layers_per_device: dict[str, int] = field(default_factory=dict)
    requested: str = ""
    reason: str = ""

    @property
    def primary(self) -> str:
        return self.devices[0]

    @property
    def spec(self) -> str:
        """``cuda:0,1`` for a split, else the one device: what the throughput engine is told."""
        if self.mode != "split":
            return self.primary
        return "cuda:" + ",".join(d.split(":", 1)[1] for d in self.devices)

    def transformers_device_map(self) -> str | dict[str, str]:
        """The ``device_map`` argument of ``from_pretrained``."""
        if self.device_map is not None:
            return dict(self.device_map)
        return "cpu" if self.mode == "cpu" else {"": self.primary}

    def record(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "requested": self.requested,
            "devices": list(self.devices),
            "layers_per_device": dict(self.layers_per_device),
            "bytes_per_device": dict(self.bytes_per_device),
            "reason": self.reason,
        }

    @classmethod
    def on(cls, device: str, requested: str = "", reason: str = "") -> Placement:
        """The whole model on one device."""
        return cls("cpu" if device == "cpu" else "single", [device], requested=requested or device, reason=reason)


def balanced_assignment(sizes: list[int], parts: int) -> list[int]:
    """Split ``sizes`` (in order) into ``parts`` contiguous non-empty runs minimizing the largest run's sum.

    Returns the run index of every item. With fewer items than parts, items get one run each.
    """
    n = len(sizes)
    if n == 0:
        return []
    parts = max(1, min(parts, n))
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][j]: smallest possible largest-run sum when the first j items form k runs
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n - (parts - k) + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                # `<=` moves cuts as late as possible on ties, so earlier GPUs hold at least their share
                if cost <= best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    out = [0] * n
    j = n
    for k in range(parts, 0, -1):
        i = cut[k][j]
        for idx in range(i, j):
            out[idx] = k - 1
        j = i
    return out


def split_units(units: list[Unit], devices: list[str]) -> dict[str, str]:
    """Device of every unit: contiguous runs balanced by bytes; tied units go where their partner went."""
    free = [u for u in units if u.tied_to is None]
    assignment = balanced_assignment([u.size for u in free], len(devices))
    device_map = {u.name: devices[a] for u, a in zip(free, assignment, strict=True)}
    for u in units:
        if u.tied_to is not None:
            device_map[u.name] = device_map.get(u.tied_to, devices[0])
    return {u.name: device_map[u.name] for u in units}


def summarize(units: list[Unit], device_map: dict[str, str], devices: list[str]) -> tuple[dict[str, int], ...]:
    """(bytes per device, decoder layers per device), every device listed."""
    nbytes = dict.fromkeys(devices, 0)
    layers = dict.fromkeys(devices, 0)
    for u in units:
        dev = device_map[u.name]
        nbytes[dev] = nbytes.get(dev, 0) + u.size
        if u.is_layer:
            layers[dev] = layers.get(dev, 0) + 1
    return nbytes, layers


def model_units(model: Any, dtype_bytes: int = 2, checkpoint_bytes: dict[str, int] | None = None) -> list[Unit]:
    """The placement units of a (meta-device) transformers model, in forward order.

    A unit is a module of a no-split class (the decoder layer, from ``model._no_split_modules``; without
    that list, each element of a ``ModuleList``), a module with tensors of its own, or a leaf. Its size is
    taken from ``checkpoint_bytes`` (bytes per tensor name, from the safetensors headers) when the
    checkpoint has tensors under it, else from the model's own tensors (floating ones at ``dtype_bytes``).
    A tensor shared by two units (a tied output head) counts once, for the first, and ties the second to it.
    """
    import torch

    no_split = set(getattr(model, "_no_split_modules", None) or [])
    units: list[Unit] = []
    owner: dict[int, str] = {}  # id of a tensor -> unit that counted it

    def tensors(mod: Any, recurse: bool) -> list[Any]:
        return [*mod.parameters(recurse=recurse), *mod.buffers(recurse=recurse)]

    def add(name: str, mod: Any, is_layer: bool) -> None:
        own = 0
        tied_to = None
        for t in tensors(mod, True):
            key = id(t)
            if key in owner:
                tied_to = tied_to or owner[key]
                continue
            owner[key] = name
            per = dtype_bytes if t.is_floating_point() else t.element_size()
            own += t.numel() * per
        if checkpoint_bytes:
            prefix = name + "."
            found = [v for k, v in checkpoint_bytes.items() if k.startswith(prefix) or k == name]
            if found:
                own = sum(found)
        # A unit whose every tensor belongs to an earlier unit is tied to it (and adds nothing).
        if tied_to is not None and all(owner.get(id(t)) != name for t in tensors(mod, True)):
            own = 0
        else:
            tied_to = None
        units.append(Unit(name, own, is_layer, tied_to))

    def walk(mod: Any, prefix: str, in_list: bool) -> None:
        children = list(mod.named_children())
        cls = type(mod).__name__
        if prefix and (cls in no_split or (not no_split and in_list) or not children or tensors(mod, False)):
            add(prefix, mod, is_layer=cls in no_split or (not no_split and in_list))
            return
        is_list = isinstance(mod, torch.nn.ModuleList)
        for child_name, child in children:
            walk(child, f"{prefix}.{child_name}" if prefix else child_name, is_list)

    walk(model, "", False)
    return units


_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_DTYPE_BYTES = {
    **_FLOAT_DTYPES, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def safetensors_bytes(folder: Path, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of every tensor in the folder's safetensors files, read from their headers only.

    Floating tensors are counted at ``dtype_bytes`` (what they take once loaded in that dtype).
    """
    out: dict[str, int] = {}
    for path in sorted(folder.glob("*.safetensors")):
        header, _ = safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            count = 1
            for dim in info.get("shape", []):
                count *= int(dim)
            dtype = str(info.get("dtype", ""))
            per = dtype_bytes if dtype in _FLOAT_DTYPES else _DTYPE_BYTES.get(dtype, 2)
            out[name] = count * per
    return out


def meta_model(folder: Path) -> Any:
    """The model of ``folder``'s config.json on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def free_gpu_memory(gpu: int) -> int:
    import torch

    free, _ = torch.cuda.mem_get_info(gpu)
    return int(free)


def plan_placement(
    target: DeviceTarget,
    folder: Path,
    *,
    dtype_bytes: int = 2,
    units: list[Unit] | None = None,
    free_memory: dict[int, int] | None = None,
) -> Placement:
    """Where the model in ``folder`` goes under ``target``.

    ``units`` and ``free_memory`` (GPU index -> free bytes) are read from the folder / the GPUs when not
    given (tests pass them).
    """
    if target.mode == "cpu":
        return Placement.on("cpu", "cpu")
    if target.mode == "single" or not target.multi_gpu:
        return Placement.on(target.primary, target.spec, "one GPU asked for" if target.mode == "single" else "")
    if units is None:
        try:
            units = model_units(meta_model(folder), dtype_bytes, safetensors_bytes(folder, dtype_bytes))
        except Exception as exc:
            if target.mode != "fit":
                raise InputError(
                    f"cannot split the model in {folder} over GPUs: {type(exc).__name__}: {exc}",
                    f"Use --device cuda:{target.gpus[0]} (one GPU).",
                ) from None
            # `auto` did not ask for a split: keep the one-GPU behaviour it always had.
            return Placement.on(target.primary, target.spec, f"not planned ({type(exc).__name__}): one GPU")
    total = sum(u.size for u in units)
    if target.mode == "fit":
        gpu = target.gpus[0]
        free = (free_memory or {}).get(gpu)
        if free is None:
            free = free_gpu_memory(gpu)
        if total <= FIT_FRACTION * free:
            reason = f"weights {total / 1e9:.2f} GB fit in {FIT_FRACTION:.0%} of cuda:{gpu}'s {free / 1e9:.1f} GB free"
            placement = Placement.on(f"cuda:{gpu}", target.spec, reason)
            placement.bytes_per_device = {placement.primary: total}
            placement.layers_per_device = {placement.primary: sum(u.is_layer for u in units)}
            return placement
        reason = (
            f"weights {total / 1e9:.2f} GB exceed {FIT_FRACTION:.0%} of cuda:{gpu}'s {free / 1e9:.1f} GB free: "
            "split by weight bytes"
        )
    else:
        reason = "split by weight bytes over the GPUs asked for"
    devices = [f"cuda:{g}" for g in target.gpus]
    device_map = split_units(units, devices)
    nbytes, layers = summarize(units, device_map, devices)
    used = [d for d in devices if any(v == d for v in device_map.values())]
    return Placement(
        mode="split" if len(used) > 1 else "single",
        devices=used,
        device_map=device_map if len(used) > 1 else None,
        bytes_per_device={d: nbytes[d] for d in used},
        layers_per_device={d: layers[d] for d in used},
        requested=target.spec,
        reason=reason,
    )


def observed_layers(model: Any) -> dict[str, int]:
    """Decoder layers per device, read from where a loaded model's layer weights really are."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    counts: dict[str, int] = {}
    for _, mod in model.named_modules():
        if type(mod).__name__ not in no_split:
            continue
        first = next(iter([*mod.parameters(), *mod.buffers()]), None)
        if first is None:
            continue
        dev = str(first.device)
        counts[dev] = counts.get(dev, 0) + 1
    return counts


def observed_bytes(model: Any) -> dict[str, int]:
    """Bytes of a loaded model's parameters and buffers per device (a tied tensor counts once)."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        dev = str(t.device)
        counts[dev] = counts.get(dev, 0) + t.numel() * t.element_size()
    return counts
