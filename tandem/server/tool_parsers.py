"""Tool calls read back out of generated text, also while it is still growing.

Every format is a run of JSON objects {"name": ..., "arguments": {...}} ("parameters" in
Llama 3's), framed differently: a JSON array (Tandem's constrained `required` output),
<tool_call>...</tool_call> blocks (Hermes, as Qwen2.5 and Tandem's fallback prompt write
them), or bare objects separated by ";" (Llama 3.x JSON). A parse of a prefix of the text is a
prefix of the parse of the whole text, so a stream's deltas are differences of parses and add
up to exactly what the non-streamed response returns.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

_ARGUMENT_KEYS = ("arguments", "parameters")
_WHITESPACE = " \t\r\n"


@dataclass
class Call:
    name: str | None = None  # set once its JSON string is complete
    arguments: str = ""  # the arguments' JSON text as far as it has been generated
    done: bool = False  # its object is closed


@dataclass
class Parsed:
    content: str  # the message text that is not a tool call
    calls: list[Call] = field(default_factory=list)


Parser = Callable[[str, bool], Parsed]  # (text, whether the text is final) -> its parse


def _string_end(text: str, i: int) -> int | None:
    """The index after the JSON string that opens at text[i], or None while it is open."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


def scan_call(text: str, i: int) -> tuple[Call, int]:
    """The call whose JSON object opens at text[i], as far as the text holds it, and the index
    after the object (len(text) while it is open). Only its top-level "name" and arguments are
    read; anything else in it is skipped."""
    call, depth, key, expect, args_start = Call(), 0, None, "key", None
    j = i
    while j < len(text):
        c = text[j]
        if c == '"':
            end = _string_end(text, j)
            if end is None:
                break
            if depth == 1:
                s = json.loads(text[j:end])
                if expect == "key":
                    key, expect = s, "colon"
                elif expect == "value":
                    if key == "name":
                        call.name = s
                    elif key in _ARGUMENT_KEYS:  # arguments given as a JSON-encoded string
                        call.arguments = s
                    expect = "next"
            j = end
            continue
        if c in "{[":
            depth += 1
            if depth == 2 and expect == "value" and key in _ARGUMENT_KEYS:
                args_start = j
        elif c in "}]":
            depth -= 1
            if depth == 1 and args_start is not None:
                call.arguments, args_start, expect = text[args_start:j + 1], None, "next"
            if depth == 0:
                call.done = True
                call.arguments = call.arguments or "{}"
                return call, j + 1
        elif depth == 1 and c == ":":
            expect = "value"
        elif depth == 1 and c == ",":
            key, expect = None, "key"
        j += 1
    if args_start is not None:
        call.arguments = text[args_start:]
    return call, len(text)


def _skip(text: str, i: int, chars: str) -> int:
    while i < len(text) and text[i] in chars:
        i += 1
    return i


def _objects(text: str, i: int, separators: str) -> tuple[list[Call], int]:
    """Calls from consecutive objects starting at text[i]; stops at anything else."""
    calls = []
    while True:
        i = _skip(text, i, separators)
        if i >= len(text) or text[i] != "{":
            return calls, i
        call, i = scan_call(text, i)
        calls.append(call)
        if not call.done:
            return calls, i


def _held(text: str, marker: str) -> int:
    """How much of text's end could be the start of `marker` (or is whitespace before it),
    which a stream must hold back until the next tokens say what it is."""
    keep = len(text)
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            keep = len(text) - k
            break
    return len(text[:keep].rstrip(_WHITESPACE))


def _named(calls: list[Call]) -> list[Call]:
    # An object without a name is not a call, and a stream cannot announce one before its name.
    return [c for c in calls if c.name is not None]


def parse_array(text: str, final: bool) -> Parsed:
    """Tandem's `required` output: a JSON array of call objects."""
    i = _skip(text, 0, _WHITESPACE)
    calls = _objects(text, i + 1, _WHITESPACE + ",")[0] if text[i:i + 1] == "[" else []
    return Parsed("", _named(calls))


def parse_hermes(text: str, final: bool) -> Parsed:
    open_, close = "<tool_call>", "</tool_call>"
    first = text.find(open_)
    if first < 0:
        return Parsed(text if final else text[:_held(text, open_)])
    calls, at = [], first
    while at >= 0:
        block, end = _objects(text, at + len(open_), _WHITESPACE)
        calls += block[:1]
        nxt = text.find(close, end)
        at = -1 if nxt < 0 else text.find(open_, nxt + len(close))
    return Parsed(text[:first].rstrip(_WHITESPACE), _named(calls))


def parse_llama3_json(text: str, final: bool) -> Parsed:
    tag = "<|python_tag|>"
    i = _skip(text, 0, _WHITESPACE)
    if text.startswith(tag, i):
        i = _skip(text, i + len(tag), _WHITESPACE)
    if i == len(text) or (not final and tag.startswith(text[i:])):
        return Parsed(text if final else "")
    if text[i] != "{":
        return Parsed(text)
    calls = _named(_objects(text, i, _WHITESPACE + ";")[0])
    if final and not calls:  # JSON, but not a call: an answer
        return Parsed(text)
    return Parsed("", calls)


def parse_arguments_of(name: str) -> Parser:
    """A named tool_choice's output: the arguments object alone."""
    def parse(text: str, final: bool) -> Parsed:
        return Parsed("", [Call(name, text, final)])
    return parse


PARSERS: dict[str, Parser] = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}
