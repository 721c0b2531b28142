"""What a request's output must match: vLLM's `structured_outputs` (a JSON schema, any JSON
object, a regex, one of a list of strings, or a grammar), as one llguidance grammar."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

# Compact JSON, as OpenAI's structured outputs return it: free whitespace would let a sampled
# request wander through newlines until max_tokens.
_JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutputs:
    json: str | None = None  # a JSON schema, as JSON text (parse takes an object too)
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None  # Lark (llguidance's) or GBNF (llama.cpp's)
    json_object: bool = False  # any JSON object
    # What errors call it: the request field it came from (e.g. response_format), when not
    # structured_outputs itself.
    source: str | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, value: StructuredOutputs | dict[str, Any],
              source: str | None = None) -> StructuredOutputs:
        """From the dict a client gives; ValueError naming the bad field."""
        if isinstance(value, StructuredOutputs):
            return value
        try:
            return cls._parse(value, source)
        except ValueError as e:
            if source is None:
                raise
            raise ValueError(f"{source}: {str(e).split(': ', 1)[1]}") from None

    @classmethod
    def _parse(cls, value: dict[str, Any], source: str | None) -> StructuredOutputs:
        if not isinstance(value, dict):
            raise ValueError("structured_outputs: must be an object")  # noqa: TRY004
        known = {f.name for f in fields(cls)} - {"source"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs.{unknown[0]}: unknown field (known: "
                             f"{', '.join(sorted(known))})")
        set_ = [k for k, v in value.items() if v is not None and v is not False]
        if len(set_) != 1:
            raise ValueError("structured_outputs: give exactly one of "
                             f"{', '.join(sorted(known))}, got {set_ or 'none'}")
        kind = set_[0]
        v = value[kind]
        if kind == "json":
            if not isinstance(v, (dict, str)):
                raise ValueError("structured_outputs.json: must be a JSON schema object")
            # Text, so that a spec is hashable and equal schemas share one compiled grammar.
            v = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        if kind in ("regex", "grammar") and not (isinstance(v, str) and v):
            raise ValueError(f"structured_outputs.{kind}: must be a non-empty string")
        if kind == "choice":
            if not (isinstance(v, (list, tuple)) and v and all(isinstance(c, str) and c
                                                               for c in v)):
                raise ValueError("structured_outputs.choice: must be a non-empty list of "
                                 "non-empty strings")
            v = tuple(v)
        if kind == "json_object" and v is not True:
            raise ValueError("structured_outputs.json_object: must be true")
        return cls(**{kind: v}, source=source)

    @property
    def kind(self) -> str:
        return next(f.name for f in fields(self)
                    if f.name != "source" and getattr(self, f.name) not in (None, False))

    @property
    def label(self) -> str:
        """The field errors name."""
        return self.source or f"structured_outputs.{self.kind}"

    def to_grammar(self) -> str:
        """The llguidance grammar; ValueError naming the field for what cannot be one (the
        compiler's own errors come at validation: GrammarCache.grammar)."""
        try:
            return self._to_grammar()
        except ValueError as e:
            if str(e).startswith(f"{self.label}: "):
                raise
            raise ValueError(f"{self.label}: {e}") from None

    def _to_grammar(self) -> str:
        kind = self.kind
        if kind == "json":
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"{self.label}: not valid JSON ({e})") from None
            return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_DEFAULTS)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}',
                                                      defaults=_JSON_DEFAULTS)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":
            # Lark string literals take JSON's escapes, so any text is one literal.
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in self.choice))
        try:
            return LLMatcher.grammar_from_lark(any_to_lark(self.grammar))
        except GbnfToLarkError as e:
            raise ValueError(f"{self.label}: {e}") from None
