"""Load HF safetensors into a model; each parameter's `weight_loader` reads only its shard."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn

from tandem.layers.linear import copy_whole
from tandem.loader.gguf_quant import GROUP, QUANT_FILE, check_supported


def load_weights(model: nn.Module, folder: str, quantized: set[str] = frozenset(),
                 dense_dtype: torch.dtype | None = None) -> None:
    """`quantized`: checkpoint prefixes (`model.layers.0.mlp.up_proj`) whose 4-bit codes are
    loaded from QUANT_FILE in place of their float32 weights. A module waiting to quantize its
    weight (`expect_quantized`) does so as soon as all of that weight's shards have loaded, so
    at most one layer's float weights are resident besides the quantized ones."""
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
    waiting = _waiting_quantization(model, packed)
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
                if target in waiting:
                    module, shards = waiting[target]
                    shards.discard(shard_id)
                    if not shards:
                        module.finish_loading(dense_dtype)
                        del waiting[target]
    done = {name for name, _ in loaded}
    missing = [n for n in params if n not in done]
    if missing:
        raise ValueError(f"model: checkpoint in {folder} lacks weights {missing[:5]}")


def _waiting_quantization(model: nn.Module, packed: dict
                          ) -> dict[str, tuple[nn.Module, set]]:
    """weight name -> (its module, the shard ids still to load) for modules to quantize."""
    waiting = {}
    for name, m in model.named_modules():
        if getattr(m, "quantize_to", None) and "weight" in m._parameters:
            ours = name.rsplit(".", 1)[-1]
            shards = {sid for target, sid in packed.values() if target == ours} or {None}
            waiting[f"{name}.weight"] = (m, shards)
    return waiting


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
               dense_dtype: torch.dtype | None = None, group_size: int = 32) -> nn.Module:
    """`quantization` as resolve_quantization gives it; `dense_dtype`: quantized layers also
    keep a dense copy in it, for steps of many rows; `group_size`: of int4 (HF folders)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    quantized = set()
    if quantization == "gguf":
        quantized = expect_gguf_quantized(model, folder)
    elif quantization in ("int4", "int8"):
        expect_quantized(model, quantization, group_size)
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    share = (config.tie_word_embeddings and head is not None
             and (hasattr(embed, "q8codes") or getattr(embed, "quantize_to", None)))
    if share:
        del head.weight  # it will multiply by the embedding's quantized table
    load_weights(model, folder, quantized, dense_dtype)
    for m in model.modules():
        if hasattr(m, "qcodes") or hasattr(m, "q8codes"):
            m.finish_loading(dense_dtype)
    if share:
        head.quant = embed.quant
    return model.eval()


def expect_quantized(model: nn.Module, method: str, group_size: int) -> None:
    """Every projection, the embedding and the LM head quantize as they load (int4/int8),
    checked before anything is read, so a size that cannot work leaves nothing half-loaded."""
    for m in model.modules():
        if hasattr(m, "expect_quantized"):
            m.expect_quantized(method, group_size)


def resolve_quantization(model: str, folder: str, requested: str, device: torch.device) -> str:
    """What `--quantization` means for this model: auto is gguf for a .gguf model whose
    projections are all Q4_0/Q4_1 on the CPU, none otherwise (on CUDA, unmeasured against
    bfloat16 so far, 4 bits only when asked for)."""
    from tandem.loader.model_path import is_gguf_model

    gguf_model = is_gguf_model(model)
    if requested in ("int4", "int8"):
        if gguf_model:
            raise ValueError(f"quantization: {requested!r} quantizes an HF checkpoint folder; "
                             f"{model!r} is a GGUF model, whose 4-bit weights 'gguf' serves as "
                             f"stored (or 'none' dequantized)")
        if requested == "int8" and device.type != "cpu":
            raise ValueError(f"quantization: 'int8' runs on the CPU only so far, not "
                             f"{device.type} (int4 runs on CUDA too)")
    if requested != "auto":
        return requested
    path = os.path.join(folder, QUANT_FILE)
    if not gguf_model or device.type != "cpu" or not os.path.isfile(path):
        return "none"
    try:
        check_supported(path)
    except ValueError:
        return "none"  # other GGUF types: served dequantized unless 'gguf' is asked for
    return "gguf"


def expect_gguf_quantized(model: nn.Module, folder: str) -> set[str]:
    """Switch every layer whose weights QUANT_FILE holds to 4 bits (the embedding and LM head to
    Q8_0); their checkpoint prefixes."""
    path = os.path.join(folder, QUANT_FILE)
    if not os.path.isfile(path):
        raise ValueError("quantization: 'gguf' needs a .gguf model with Q4_0 or Q4_1 weights "
                         f"(none in {folder})")
    check_supported(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = set(f.keys())
    modules = dict(model.named_modules())
    q8 = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".q8codes")}
    for prefix in q8:
        if not hasattr(modules.get(prefix), "expect_q8_0"):
            raise ValueError(f"model: 8-bit weight {prefix!r} has no place in the model")
        modules[prefix].expect_q8_0()
    q4 = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".qcodes")}
    packed = getattr(model, "packed_modules", {})
    parts: dict[str, set[str]] = {}  # our module -> its checkpoint prefixes held at 4 bits
    for prefix in q4:
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
    return q4 | q8
