"""`--speculative-config`: vLLM's JSON shape, checked field by field."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_SPECULATIVE_TOKENS = 16
_FIELDS = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model"}
_NGRAM_ONLY = ("prompt_lookup_min", "prompt_lookup_max")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # "ngram" or "draft_model"
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    model: str | None = None  # the draft model (draft_model only)

    @classmethod
    def parse(cls, value: str | dict[str, Any]) -> SpeculativeConfig:
        """From the JSON text or dict a user gives; ValueError naming the bad field."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise ValueError(f"speculative_config: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config: must be a JSON object")  # noqa: TRY004
        unknown = sorted(set(value) - _FIELDS)
        if unknown:
            raise ValueError(f"speculative_config.{unknown[0]}: unknown field (known: "
                             f"{', '.join(sorted(_FIELDS))})")
        method = value.get("method")
        if method not in ("ngram", "draft_model"):
            raise ValueError(f"speculative_config.method: must be ngram or draft_model, got "
                             f"{method!r}")
        k = value.get("num_speculative_tokens")
        _check_int("num_speculative_tokens", k, 1, MAX_SPECULATIVE_TOKENS)
        if method == "draft_model":
            model = value.get("model")
            if not isinstance(model, str) or not model:
                raise ValueError("speculative_config.model: draft_model needs the draft's path "
                                 f"(a checkpoint folder or .gguf file), got {model!r}")
            for name in _NGRAM_ONLY:
                if name in value:
                    raise ValueError(f"speculative_config.{name}: only for method ngram")
            return cls(method, k, model=model)
        if "model" in value:
            raise ValueError("speculative_config.model: only for method draft_model")
        lo = value.get("prompt_lookup_min", cls.prompt_lookup_min)
        hi = value.get("prompt_lookup_max", max(cls.prompt_lookup_max, lo)
                       if isinstance(lo, int) else cls.prompt_lookup_max)
        _check_int("prompt_lookup_min", lo, 1, 64)
        _check_int("prompt_lookup_max", hi, lo, 64)
        return cls(method, k, lo, hi)

    def to_dict(self) -> dict[str, Any]:
        if self.method == "draft_model":
            return {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens,
                    "model": self.model}
        return {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens,
                "prompt_lookup_min": self.prompt_lookup_min,
                "prompt_lookup_max": self.prompt_lookup_max}


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"speculative_config.{name}: must be an integer in [{lo}, {hi}], "
                         f"got {value!r}")
