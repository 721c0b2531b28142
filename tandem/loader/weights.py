"""Load HF safetensors into a model; each parameter's `weight_loader` reads only its shard."""
from __future__ import annotations

import glob
import os

import torch
from safetensors import safe_open
from torch import nn

from tandem.layers.linear import copy_whole


def load_weights(model: nn.Module, folder: str) -> None:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {folder}")
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules", {})
    tied = model.config.tie_word_embeddings
    loaded = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                    continue
                tensor = f.get_slice(name)
                for ckpt_key, (ours, shard_id) in packed.items():
                    if f".{ckpt_key}." in name:
                        target = name.replace(ckpt_key, ours)
                        param = _param(params, target, name)
                        param.weight_loader(param, tensor, shard_id)
                        loaded.add((target, shard_id))
                        break
                else:
                    param = _param(params, name, name)
                    getattr(param, "weight_loader", _default_loader)(param, tensor)
                    loaded.add((name, None))
    done = {name for name, _ in loaded}
    missing = [n for n in params if n not in done]
    if missing:
        raise ValueError(f"model: checkpoint in {folder} lacks weights {missing[:5]}")


def _param(params: dict[str, nn.Parameter], name: str, ckpt_name: str) -> nn.Parameter:
    if name not in params:
        raise ValueError(f"model: checkpoint weight {ckpt_name!r} has no place in the model")
    return params[name]


def _default_loader(param: nn.Parameter, loaded) -> None:
    copy_whole(param, loaded)


def load_model(model_cls, config, folder: str, device: torch.device,
               dtype: torch.dtype) -> nn.Module:
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(default)
    load_weights(model, folder)
    return model.eval()
