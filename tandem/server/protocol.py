"""Request bodies of the OpenAI API (plus vLLM's sampling extras) and their SamplingParams."""
from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from tandem.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from tandem.structured.params import StructuredOutputs


def _invalid(message: str) -> PydanticCustomError:
    """A validation error whose message is ours, without pydantic's "Value error, " prefix."""
    return PydanticCustomError("invalid_value", message)


def _not_supported(value: object) -> None:
    if value is not None:
        raise PydanticCustomError("not_supported", "not supported by Tandem")


def _only_with(field: str, flag: str):
    """A validator for `field`: set only when the bool `flag`, declared before it, is true, as
    OpenAI requires (an option of a feature that is off would be ignored)."""
    def check(value: object, info: ValidationInfo) -> object:
        if value is not None and not info.data.get(flag):
            raise _invalid(f"only allowed when {flag} is true")
        return value
    return field_validator(field)(check)


# An OpenAI field Tandem does not implement: accepting it would silently change what the client
# asked for, so any value but null (what clients send for "not set") is a 400 naming it. Left out
# of the OpenAPI schema, which lists only what Tandem does.
Unsupported = SkipJsonSchema[Annotated[object, AfterValidator(_not_supported)]]


class Body(BaseModel):
    """A JSON object of the API, read as OpenAI reads it: exact JSON types ("5" is not 5, 5.0 is
    not an int; an int is a float) and no field Tandem would accept and then ignore."""
    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: object) -> object:
        # OpenAI reads null as "not set" ("n": null is n = 1). Fields whose type gives null a
        # meaning of its own (completions' max_tokens: the rest of the context) keep it.
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields
                or cls.model_fields[k].is_required()
                or type(None) in get_args(cls.model_fields[k].annotation)}


class StreamOptions(Body):
    include_usage: bool = False


class SamplingFields(Body):
    model: str | None = None
    n: int = Field(default=1, le=128)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # Structured outputs, vLLM's names: the current object and the older guided_* fields.
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    _stream_options_need_stream = _only_with("stream_options", "stream")

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_not_streamed(cls, value: int | None, info: ValidationInfo):
        if value is not None and info.data.get("stream"):  # as vLLM: no chunk carries them
            raise _invalid("not supported with stream")
        return value

    def structured_spec(self) -> StructuredOutputs | None:
        """The one structured-output constraint the body sets; ValueError naming its field."""
        given = [(name, spec) for name, spec in self._structured_fields() if spec is not None]
        if len(given) > 1:
            raise ValueError(f"{given[1][0]}: only one of {', '.join(n for n, _ in given)} "
                             f"may be given")
        if not given:
            return None
        name, spec = given[0]
        return StructuredOutputs.parse(spec, None if name == "structured_outputs" else name)

    def _structured_fields(self) -> list[tuple[str, dict | None]]:
        given = [("structured_outputs", self.structured_outputs)]
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            given.append((f"guided_{kind}", None if value is None else {kind: value}))
        return given

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        structured: StructuredOutputs | None = None) -> SamplingParams:
        """`structured`: the output constraint when something else (tool_choice) sets it."""
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError("logit_bias: keys must be token ids") from None
        return SamplingParams(
            n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
            max_tokens=max_tokens, min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            logprobs=logprobs, logit_bias=bias, skip_special_tokens=self.skip_special_tokens,
            structured_outputs=structured or self.structured_spec(),
            prompt_logprobs=self.prompt_logprobs)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    # Tandem returns every sequence it samples: best_of is accepted only where that is the same.
    best_of: int | None = None
    suffix: Unsupported = None

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo):
        if value is not None and value != info.data.get("n", value):
            raise _invalid("must equal n: Tandem does not rank samples to return the best")
        return value


class ContentPart(Body):
    type: Literal["text"]
    text: str


class FunctionDef(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None


class ToolDef(Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    # "function" is the legacy API's tool result, named by `name`.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, validate_default=True)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, validate_default=True)
    function_call: FunctionCall | None = None

    @field_validator("name", "tool_calls", "tool_call_id", "function_call")
    @classmethod
    def _fields_of_its_role(cls, value: object, info: ValidationInfo) -> object:
        # Rejected by name rather than dropped: a template would print none of them elsewhere.
        role = info.data.get("role")
        only = {"tool_calls": "assistant", "function_call": "assistant", "tool_call_id": "tool",
                "name": "function"}[info.field_name]
        if value is not None and role != only:
            raise _invalid(f"only allowed in a {only!r} message")
        if value is None and role == only and info.field_name in ("name", "tool_call_id"):
            raise _invalid(f"required in a {only!r} message")
        return value

    @property
    def text(self) -> str:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return content or ""


class JsonSchemaFormat(Body):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict = Field(default_factory=dict, alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise _invalid("json_schema is required with type json_schema, and only then")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # The legacy API: functions are tools, and function_call is tool_choice without "required".
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None

    _top_logprobs_need_logprobs = _only_with("top_logprobs", "logprobs")

    def _structured_fields(self) -> list[tuple[str, dict | None]]:
        fmt, name, spec = self.response_format, "response_format", None
        if fmt is not None and fmt.type == "json_object":
            spec = {"json_object": True}
        elif fmt is not None and fmt.type == "json_schema":
            name, spec = "response_format.json_schema.schema", {"json": fmt.json_schema.schema_}
        return [(name, spec), *super()._structured_fields()]


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]
