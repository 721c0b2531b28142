"""Load HF safetensors into a model; each parameter's `weight_loader` reads only its shard."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn

from tandem.layers.linear import copy_whole
from tandem.loader.gguf_quant import GROUP, QUANT_FILE, check_supported


def load_weights(model: nn.Module, folder: str, quantized: set[str] = frozenset()) -> None:
    """`quantized`: checkpoint prefixes (`model.layers.0.mlp.up_proj`) whose 4-bit codes are
    loaded from QUANT_FILE in place of their float32 weights."""
    files = sorted(f for f in glob.glob(os.path.join(folder, "*.safetensors"))
                   if os.path.basename(f) != QUANT_FILE)
    if not files:
        raise ValueError(f"model: no *.safetensors files in {folder}")
    if quantized:
        files.append(os.path.join(folder, QUANT_FILE))
    skip = {f"{prefix}.weight" for prefix in quantized}
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    tied = model.config.tie_word_embeddings
    loaded = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if ("rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight")
                        or name in skip):
                    continue
                tensor = f.get_slice(name)
                target, shard_id = checkpoint_target(name, packed)
                param = _param(params, target, name)
                if shard_id is None:
                    getattr(param, "weight_loader", _default_loader)(param, tensor)
                else:
                    param.weight_loader(param, tensor, shard_id)
                loaded.add((target, shard_id))
    done = {name for name, _ in loaded}
    missing = [n for n in params if n not in done]
    if missing:
        raise ValueError(f"model: checkpoint in {folder} lacks weights {missing[:5]}")


def checkpoint_target(name: str, packed: dict) -> tuple[str, str | int | None]:
    """Our parameter for a checkpoint tensor: q_proj's rows go to qkv_proj as shard "q", ...;
    a tensor of no packed module keeps its name (shard None)."""
    for ckpt_key, (ours, shard_id) in packed.items():
        if f".{ckpt_key}." in name:
            return name.replace(ckpt_key, ours), shard_id
    return name, None


def _param(params: dict[str, nn.Parameter], name: str, ckpt_name: str) -> nn.Parameter:
    if name not in params:
        raise ValueError(f"model: checkpoint weight {ckpt_name!r} has no place in the model")
    return params[name]


def _default_loader(param: nn.Parameter, loaded) -> None:
    copy_whole(param, loaded)


def load_model(model_cls, config, folder: str, device: torch.device,
               dtype: torch.dtype, quantization: str = "none",
               dense_dtype: torch.dtype | None = None) -> nn.Module:
    """`dense_dtype`: quantized layers also keep a dense copy in it, for steps of many rows."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    quantized = expect_gguf_int4(model, folder, device) if quantization == "gguf" else set()
    load_weights(model, folder, quantized)
    for m in model.modules():
        if hasattr(m, "qcodes"):
            m.pack_int4(GROUP, dense_dtype)
    return model.eval()


def expect_gguf_int4(model: nn.Module, folder: str, device: torch.device) -> set[str]:
    """Switch every layer whose weights QUANT_FILE holds to 4-bit; their checkpoint prefixes."""
    path = os.path.join(folder, QUANT_FILE)
    if not os.path.isfile(path):
        raise ValueError("quantization: 'gguf' needs a .gguf model with Q4_0 or Q4_1 weights "
                         f"(none in {folder})")
    if device.type != "cpu":
        raise ValueError(f"quantization: 'gguf' runs on the CPU only so far, not {device.type}")
    check_supported(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        prefixes = {k.rsplit(".", 1)[0] for k in f.keys()}  # noqa: SIM118
    packed = getattr(model, "packed_modules", {})
    modules = dict(model.named_modules())
    parts: dict[str, set[str]] = {}  # our module -> its checkpoint prefixes held at 4 bits
    for prefix in prefixes:
        ours = checkpoint_target(f"{prefix}.qcodes", packed)[0].rsplit(".", 1)[0]
        if not hasattr(modules.get(ours), "expect_int4"):
            raise ValueError(f"model: 4-bit weight {prefix!r} has no place in the model")
        parts.setdefault(ours, set()).add(prefix)
    for ours, held in parts.items():
        # q, k and v (gate and up) share one matrix: all of it 4-bit, or none
        want = {ours.replace(v[0], k) for k, v in packed.items() if f".{v[0]}" in ours} or {ours}
        if held != want:
            raise ValueError(f"quantization: 'gguf' needs all of {sorted(want)} in Q4_0/Q4_1; "
                             f"the file has only {sorted(held)}")
        modules[ours].expect_int4(GROUP)
    return prefixes
