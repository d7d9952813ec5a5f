"""Request models of the OpenAI endpoints the gateway serves.

Known OpenAI fields are validated here (ranges and shapes, so a bad request is refused with a 400
before it costs a back-end round trip); fields vLLM understands beyond OpenAI's (``top_k``,
``min_p``, ``repetition_penalty``, ...) are kept as extras and passed through unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
ToolChoiceMode = Literal["none", "auto", "required"]
#: OpenAI's limits on function tools: names of letters, digits, `_` and `-`, at most 64; at most 128 tools
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOOLS = 128


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


def _object_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    if parameters.get("type", "object") != "object":  # OpenAI refuses any other JSON Schema type
        raise ValueError(f'parameters must be a JSON Schema of type "object", not {parameters.get("type")!r}')
    return parameters


#: a function's `parameters`: a JSON Schema that describes an object
ObjectSchema = Annotated[dict[str, Any], AfterValidator(_object_schema)]


def unique_tool_names(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"tool names must be unique: `{name}` is defined twice")
        seen.add(name)


def named_tool_is_offered(name: str | None, choice: str | None, names: list[str] | None) -> None:
    """A `required` or named tool choice needs tools, and a named one must be among them."""
    if choice is None or choice in ("none", "auto"):
        return
    if not names:
        raise ValueError(f"{name or choice!r} needs `tools`")
    if name is not None and name not in names:
        raise ValueError(f"`{name}` is not among the tools ({', '.join(names)})")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=TOOL_NAME, description="The function's name (letters, digits, `_`, `-`; 64 at most).")
    description: str | None = None
    parameters: ObjectSchema | None = Field(None, description="Its arguments, as a JSON Schema object.")
    strict: bool | None = None


class ChatTool(BaseModel):
    """A function the model may call (the only kind of tool vLLM serves)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)


class ChatNamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arguments: str = Field(description="The arguments as a JSON string.")


class ChatToolCall(BaseModel):
    """A call an assistant message made (sent back with the conversation)."""

    model_config = ConfigDict(extra="allow")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class _SamplingRequest(BaseModel):
    """Fields shared by chat and legacy completions."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if not -100 <= value <= 100:
                raise ValueError("logit_bias values must be between -100 and 100")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def wants_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoiceMode | ChatNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[ChatTool] | None) -> list[ChatTool] | None:
        unique_tool_names([t.function.name for t in tools or ()])
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_offered(
        cls, choice: ToolChoiceMode | ChatNamedToolChoice | None, info: ValidationInfo
    ) -> ToolChoiceMode | ChatNamedToolChoice | None:
        tools = info.data.get("tools")
        names = [t.function.name for t in tools] if tools else None
        if isinstance(choice, ChatNamedToolChoice):
            named_tool_is_offered(choice.function.name, "function", names)
        else:
            named_tool_is_offered(None, choice, names)
        return choice

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(
        cls, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be an empty list")
        return prompt


class ResponsesFunctionTool(BaseModel):
    """A function tool of the Responses API (flat: no `function` wrapper)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = Field(description="Only function tools are served (vLLM runs no built-in tools here).")
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: ObjectSchema | None = None
    strict: bool | None = None


class ResponsesNamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    name: str = Field(min_length=1)


class ResponsesRequest(BaseModel):
    """POST /v1/responses. What the gateway acts on is declared; everything else (`text`, `include`, `metadata`,
    vLLM's extras, ...) is passed through to vLLM unchanged."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="The alias.")
    input: str | list[dict[str, Any]] = Field(
        description="A user message, or the conversation as input items (messages, `function_call`, "
        "`function_call_output`)."
    )
    instructions: str | None = Field(
        None, description="The system message (the alias's system prompt gives way to it)."
    )
    max_output_tokens: int | None = Field(None, ge=1, description="Output length limit in tokens.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    tools: list[ResponsesFunctionTool] | None = Field(None, max_length=MAX_TOOLS, description="Function tools.")
    tool_choice: ToolChoiceMode | ResponsesNamedToolChoice | None = Field(
        None, description='`none`, `auto`, `required`, or `{"type": "function", "name": ...}`.'
    )
    parallel_tool_calls: bool | None = None
    stream: bool | None = Field(False, description="Server-sent `response.*` events.")
    user: str | None = Field(None, description="The end user's id (sticky A/B arms).")
    store: bool | None = Field(None, description="Must be false or absent: nothing is stored (400 otherwise).")
    background: bool | None = Field(None, description="Must be false or absent (400 otherwise).")
    previous_response_id: str | None = Field(None, description="Not supported (400): send the whole conversation.")
    conversation: str | dict[str, Any] | None = Field(None, description="Not supported (400).")
    prompt: dict[str, Any] | None = Field(None, description="Stored prompt templates are not supported (400).")

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[ResponsesFunctionTool] | None) -> list[ResponsesFunctionTool] | None:
        unique_tool_names([t.name for t in tools or ()])
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_offered(
        cls, choice: ToolChoiceMode | ResponsesNamedToolChoice | None, info: ValidationInfo
    ) -> ToolChoiceMode | ResponsesNamedToolChoice | None:
        tools = info.data.get("tools")
        names = [t.name for t in tools] if tools else None
        if isinstance(choice, ResponsesNamedToolChoice):
            named_tool_is_offered(choice.name, "function", names)
        else:
            named_tool_is_offered(None, choice, names)
        return choice

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        return value
