"""Tandem: an LLM serving engine with a paged KV cache and continuous batching."""
from tandem.engine.llm import LLM
from tandem.engine.outputs import CompletionOutput, Logprob, RequestOutput
from tandem.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
