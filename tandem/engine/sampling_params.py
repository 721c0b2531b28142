"""Per-request sampling settings; every check on client input lives here."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tandem.structured.params import StructuredOutputs

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    # Each prompt token's logprob and the top N at its position (vLLM's extra); the request
    # then computes its whole prompt, taking no prefix-cache hit.
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    # The output must match this (a JSON schema, regex, choice or grammar); a dict is parsed.
    structured_outputs: StructuredOutputs | dict | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputs.parse(self.structured_outputs)
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        check(_is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1")
        check(_is_num(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0")
        check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "must be -1 (off) or >= 0")
        check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
              "repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            check(_is_num(getattr(self, name)) and -2 <= getattr(self, name) <= 2, name,
                  "must be in [-2, 2]")
        check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed
                                    and self.seed + max(self.n, 1) - 1 < 2**64),
              "seed", "must be an integer in [-2**63, 2**64 - n]")
        check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be >= 1")
        check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
              "must be in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name,
                  f"must be in [0, {MAX_LOGPROBS}]")
        check(all(isinstance(s, str) and s for s in self.stop_strings), "stop",
              "must be non-empty strings")
        check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "must be non-negative integers")
        if self.logit_bias is not None:
            check(all(_is_int(k) and k >= 0 and _is_num(v) and -100 <= v <= 100
                      for k, v in self.logit_bias.items()), "logit_bias",
                  "must map token ids to values in [-100, 100]")

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids from the client must index the vocabulary."""
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", list(self.logit_bias or {}))):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise ValueError(f"{name}: token id {bad[0]} is outside the vocabulary "
                                 f"(size {vocab_size})")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
