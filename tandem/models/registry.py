"""HF `architectures[0]` -> model class."""
from __future__ import annotations

from torch import nn

from tandem.models.llama import LlamaForCausalLM
from tandem.models.qwen2 import Qwen2ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def model_class(config) -> type[nn.Module]:
    # Some converted configs carry no `architectures`; fall back on the model type.
    archs = getattr(config, "architectures", None) or [
        {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
         "qwen2": "Qwen2ForCausalLM"}.get(getattr(config, "model_type", ""), "")]
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(f"model: architecture {archs or '(none)'} is not supported; "
                     f"supported: {', '.join(sorted(MODELS))}")
