"""The offline API: `LLM(model="smollm2").generate(prompts, params)` and `.chat(messages)`."""
from __future__ import annotations

import itertools
from typing import Any

from tandem.config import EngineConfig
from tandem.engine.engine import LLMEngine
from tandem.engine.outputs import RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.loader.tokenizer import render_chat

Prompt = str | dict[str, Any]


class LLM:
    def __init__(self, model: str = "smollm2", **engine_args: Any):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop tensor-parallel workers now (they also stop when this process exits)."""
        self.engine.shutdown()

    def generate(self, prompts: Prompt | list[Prompt],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Prompts are strings or {"prompt_token_ids": [...]} dicts; outputs keep their order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("sampling_params: need one per prompt or a single one")
        return self._run([(_prompt_of(p), None, sp) for p, sp in zip(prompts, params)])

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        jobs = []
        for conv in conversations:
            text, ids = render_chat(self.tokenizer, conv, add_generation_prompt)
            jobs.append((ids, text, sampling_params or SamplingParams()))
        return self._run(jobs)

    def _run(self, jobs: list[tuple[Any, str | None, SamplingParams]]) -> list[RequestOutput]:
        ids = []
        try:
            for prompt, text, sp in jobs:
                ids.append(str(next(self._ids)))
                self.engine.add_request(ids[-1], prompt, sp, prompt_text=text)
        except ValueError:
            for rid in ids:  # a bad prompt cancels the whole call, leaving no stray requests
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]


def _prompt_of(p: Prompt) -> str | list[int]:
    if isinstance(p, str):
        return p
    if isinstance(p, dict) and "prompt_token_ids" in p:
        return p["prompt_token_ids"]
    if isinstance(p, dict) and "prompt" in p:
        return p["prompt"]
    raise ValueError(f"prompt: expected a string or a dict with 'prompt_token_ids', got {p!r}")
