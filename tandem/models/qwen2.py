"""Qwen2: the Llama layout with a bias on the q/k/v projections only."""
from __future__ import annotations

from tandem.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        return True, False
