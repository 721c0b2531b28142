"""Tool calls on /v1/chat/completions: what a request's tools make of its prompt, its output
constraint and its response (docs/architecture.md, "Tool calls")."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from tandem.loader.tokenizer import render_chat
from tandem.server.protocol import ChatCompletionRequest, ChatMessage, FunctionName, ToolDef
from tandem.server.tool_parsers import PARSERS, Call, Parser, parse_arguments_of, parse_array
from tandem.structured.params import StructuredOutputs

# The prompt for models whose chat template knows no tools (SmolLM2's): Hermes' format, which
# the default parser reads back.
FALLBACK_PROMPT = """You can call functions. To call one, reply with only this, one block per call:
<tool_call>
{{"name": <function name>, "arguments": <arguments as a JSON object>}}
</tool_call>
The functions:
<tools>
{tools}
</tools>"""


@dataclass(frozen=True)
class ToolPlan:
    tools: list[ToolDef] = field(default_factory=list)  # what the prompt lists
    choice: str = "none"  # none, auto, required or named
    parallel: bool = True
    legacy: bool = False  # `functions`: one call, answered in message.function_call
    parser: Parser | None = None  # how calls are read from the output; None: they are not
    # The output constraint of `required` and a named function, and the per-tool schemas it is
    # made of (compiled first, so a bad one is named by its own field).
    constraint: StructuredOutputs | None = None
    parts: tuple[StructuredOutputs, ...] = ()


def plan_tools(body: ChatCompletionRequest, parser_name: str) -> ToolPlan:
    """The request's tools, tool_choice and parallel_tool_calls (or the legacy functions and
    function_call), checked; ValueError naming the field."""
    tools, choice, legacy = body.tools, body.tool_choice, False
    if body.functions is not None or body.function_call is not None:
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            if getattr(body, name) is not None:
                raise ValueError(f"{name}: cannot be combined with the legacy functions / "
                                 f"function_call")
        tools = [ToolDef(type="function", function=f) for f in body.functions or []]
        choice, legacy = body.function_call, True
        if choice is not None and not tools:
            raise ValueError("function_call: only allowed when functions are given")
    elif not tools:
        for name in ("tool_choice", "parallel_tool_calls"):
            if getattr(body, name) not in (None, "none"):
                raise ValueError(f"{name}: only allowed when tools are given")
    tools = tools or []
    choice_field = "function_call" if legacy else "tool_choice"
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"{'functions' if legacy else 'tools'}.{i}.function.name: "
                             f"{name!r} is defined twice")
    named = None
    if choice is None:
        choice = "auto" if tools else "none"
    elif not isinstance(choice, str):
        named = choice.name if isinstance(choice, FunctionName) else choice.function.name
        if named not in names:
            raise ValueError(f"{choice_field}: no tool named {named!r} is given")
        choice = "named"
    if choice == "none":
        return ToolPlan()
    parallel = not legacy and body.parallel_tool_calls is not False
    if choice == "auto" and not any(t.function.strict for t in tools):
        # Unconstrained; the request's own response_format may still shape it.
        return ToolPlan(tools, choice, parallel, legacy, PARSERS[parser_name])
    prefix = "functions" if legacy else "tools"
    parts = tuple(StructuredOutputs(json=json.dumps(_parameters(t), sort_keys=True),
                                    source=f"{prefix}.{i}.function.parameters")
                  for i, t in enumerate(tools))
    strict = [part for t, part in zip(tools, parts) if t.function.strict]
    structured = body.structured_spec()
    if structured is not None:
        why = "strict tools" if choice == "auto" else f"{choice_field} {choice!r}"
        raise ValueError(f"{structured.label.split('.')[0]}: cannot be combined with {why}, "
                         f"which constrain the output themselves")
    if choice == "auto":
        grammar = _auto_grammar(parser_name, tools, parallel)
        return ToolPlan(tools, choice, parallel, legacy, PARSERS[parser_name],
                        StructuredOutputs(grammar=grammar, source=prefix), tuple(strict))
    if choice == "named":
        i = names.index(named)
        return ToolPlan(tools, choice, False, legacy, parse_arguments_of(named), parts[i],
                        (parts[i],))
    array = {"type": "array", "minItems": 1, "items": _call_schema(tools, "arguments", False)}
    if not parallel:
        array["maxItems"] = 1
    # Keys unsorted: llguidance writes properties in the schema's order, and "name" must come
    # first for a stream to announce a call before its arguments.
    return ToolPlan(tools, choice, parallel, legacy, parse_array,
                    StructuredOutputs(json=json.dumps(array), source=prefix), parts)


def _parameters(tool: ToolDef) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _call_schema(tools: list[ToolDef], key: str, strict_only: bool) -> dict:
    """A call of any of `tools`: {"name": its name, key: its arguments}, with `name` first (the
    order llguidance writes them in), so a stream can announce a call before its arguments.
    `strict_only`: only `strict` tools' arguments must match their parameters."""
    def arguments(t: ToolDef) -> dict:
        return _parameters(t) if t.function.strict or not strict_only else {"type": "object"}
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                        key: arguments(t)},
                       "required": ["name", key], "additionalProperties": False}
                      for t in tools]}


def _auto_grammar(parser: str, tools: list[ToolDef], parallel: bool) -> str:
    """`auto` with `strict` tools: free text, or calls in the parser's format whose arguments
    match. Hermes' free text holds no "<", so that the lexer knows where a call begins."""
    if parser == "hermes":
        call = json.dumps(_call_schema(tools, "arguments", True))
        return (f"start: TEXT call{'*' if parallel else '?'}\nTEXT: /[^<]*/\n"
                f'call: "<tool_call>\\n" %json {call} "\\n</tool_call>" TEXT\n')
    call = json.dumps(_call_schema(tools, "parameters", True))
    more = ' ("; " call)*' if parallel else ""
    return f"start: TEXT | call{more}\nTEXT: /[^{{](.|\\n)*/\ncall: %json {call}\n"


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage],
                    tools: list[ToolDef], add_generation_prompt: bool = True
                    ) -> tuple[str, list[int]]:
    """The prompt: by the chat template with tools, where the template takes them, else with
    tools, calls and results written in FALLBACK_PROMPT's format."""
    if _template_takes_tools(tokenizer):
        return render_chat(tokenizer, [_template_message(m) for m in messages],
                           add_generation_prompt, [t.model_dump(exclude_none=True) for t in tools])
    out = [_fallback_message(m) for m in messages]
    if tools:
        listed = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False)
                           for t in tools)
        prompt = FALLBACK_PROMPT.format(tools=listed)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return render_chat(tokenizer, out, add_generation_prompt)


def _template_takes_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    template = tokenizer.chat_template
    return isinstance(template, str) and "tools" in template


def _calls_of(m: ChatMessage) -> list[dict]:
    """An assistant message's calls, arguments as objects where they are JSON objects (the
    form chat templates print with tojson)."""
    calls = [(c.id, c.function) for c in m.tool_calls or []]
    if m.function_call is not None:
        calls.append((None, m.function_call))
    out = []
    for id_, f in calls:
        try:
            arguments = json.loads(f.arguments)
        except ValueError:
            arguments = f.arguments
        out.append({"id": id_, "type": "function",
                    "function": {"name": f.name, "arguments": arguments}})
    return out


def _template_message(m: ChatMessage) -> dict:
    role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
    out = {"role": role, "content": m.text}
    if m.role == "assistant" and (m.tool_calls or m.function_call):
        out["tool_calls"] = _calls_of(m)
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _fallback_message(m: ChatMessage) -> dict:
    if m.role in ("tool", "function"):  # a legacy function result says whose it is
        text = m.text if m.name is None else f"{m.name}: {m.text}"
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
    content = m.text
    for call in _calls_of(m) if m.role == "assistant" else []:
        content += ("\n" if content else "") + "<tool_call>\n" + json.dumps(
            {"name": call["function"]["name"], "arguments": call["function"]["arguments"]},
            ensure_ascii=False) + "\n</tool_call>"
    return {"role": "system" if m.role == "developer" else m.role, "content": content}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChoiceOutput:
    """One choice of a chat response: its message, or the deltas that stream it."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.content_sent = 0
        self.ids: list[str] = []  # of the calls streamed so far
        self.arguments_sent: list[int] = []

    def _parse(self, text: str, final: bool) -> tuple[str | None, list[Call]]:
        if self.plan.parser is None:
            return text, []
        parsed = self.plan.parser(text, final)
        calls = parsed.calls if self.plan.parallel else parsed.calls[:1]
        return parsed.content, calls

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        if reason != "stop" or not called:
            return reason
        return "function_call" if self.plan.legacy else "tool_calls"

    def message(self, text: str, reason: str | None) -> tuple[dict, str | None]:
        """The non-streamed message and finish_reason."""
        content, calls = self._parse(text, True)
        msg = {"role": "assistant", "content": content if not calls else content or None}
        if self.plan.legacy and calls:
            msg["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
        elif calls:
            msg["tool_calls"] = [{"id": _call_id(), "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in calls]
        return msg, self.finish_reason(reason, bool(calls))

    def delta(self, text: str, final: bool) -> dict:
        """What the stream has not sent yet of the output so far."""
        content, calls = self._parse(text, final)
        delta = {}
        if content and len(content) > self.content_sent:
            delta["content"] = content[self.content_sent:]
            self.content_sent = len(content)
        pieces = []
        for i, call in enumerate(calls):
            if i == len(self.ids):
                self.ids.append(_call_id())
                self.arguments_sent.append(len(call.arguments))
                pieces.append({"index": i, "id": self.ids[i], "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}})
            elif len(call.arguments) > self.arguments_sent[i]:
                pieces.append({"index": i, "function": {
                    "arguments": call.arguments[self.arguments_sent[i]:]}})
                self.arguments_sent[i] = len(call.arguments)
        if pieces and self.plan.legacy:
            delta["function_call"] = pieces[0]["function"]
        elif pieces:
            delta["tool_calls"] = pieces
        return delta

    @property
    def called(self) -> bool:
        return bool(self.ids)
