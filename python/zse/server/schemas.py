"""Request and response bodies, mirroring OpenAI's. Unknown request fields are
ignored (clients send many); every known one is range-checked here, so a bad value
is a 400 naming the parameter before any work starts. Fields that would change what
the model must produce and that ZSE does not implement (the deprecated
``functions``/``function_call``) are refused with a 400 naming them, never silently
ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20
MAX_LEGACY_LOGPROBS = 5


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCallInfo(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallInfo] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and (self.tool_call_id is None or self.content is None):
            raise ValueError("a tool message needs tool_call_id and content")
        return self

    @field_validator("content")
    @classmethod
    def _text_parts_only(
        cls, v: str | list[dict[str, Any]] | None
    ) -> str | list[dict[str, Any]] | None:
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        "only text content parts ({'type': 'text', 'text': ...}) are supported"
                    )
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part["text"] for part in self.content)

    def engine_message(self) -> dict[str, Any]:
        """The message as `zse.Engine` takes it (``developer`` is ``system``)."""
        m: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            m["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            m["name"] = self.name
        return m


class JsonSchemaFormat(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` is a method of pydantic models: the field takes another name.
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """Structured output: the engine holds every choice to the grammar (Rust
    `zse_core::grammar`); a schema it cannot compile is a 400 naming
    `response_format`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_for_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self

    def engine_format(self) -> dict[str, Any] | None:
        """The object `zse.Engine` takes, OpenAI's own shape (None for plain text)."""
        if self.type == "text":
            return None
        return self.model_dump(by_alias=True, exclude_none=True)


class _Sampling(_Request):
    """The parameters chat and legacy completions share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # Common extensions (vLLM, llama.cpp): 0 or -1 turns top_k off.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    user: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if len(v) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
            if any(not s for s in v):
                raise ValueError("stop sequences must not be empty")
        elif v == "":
            raise ValueError("stop sequences must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias {bias} for token {key} is not between -100 and 100")
        return v

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling(self, max_tokens: int | None, top_logprobs: int | None) -> dict[str, Any]:
        """Keyword arguments for `zse.Engine` generation (OpenAI's defaults where the
        client sent nothing)."""
        kw: dict[str, Any] = {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": max(self.top_k or 0, 0),
            "min_p": self.min_p or 0.0,
            "repetition_penalty": self.repetition_penalty or 1.0,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "max_tokens": max_tokens,
            "seed": self.seed,
            "stop": self.stop,
        }
        if self.logit_bias:
            kw["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        if top_logprobs is not None:
            kw["logprobs"] = True
            kw["top_logprobs"] = top_logprobs
        if self.response_format is not None:
            kw["response_format"] = self.response_format.engine_format()
        return kw


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Tool calling (checked by `zse.chat.tools`, whose errors are 400s too).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # OpenAI's deprecated form of tools: an empty list or "none" asks for nothing.
    functions: list[Any] | None = None
    function_call: Any = None
    # More variables for the chat template (vLLM's and SGLang's extension), e.g.
    # {"enable_thinking": false} for Qwen3.
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("functions")
    @classmethod
    def _no_functions(cls, v: list[Any] | None) -> list[Any] | None:
        if v:
            raise ValueError("functions (deprecated) is not supported; use tools")
        return v

    @field_validator("function_call")
    @classmethod
    def _no_function_call(cls, v: Any) -> Any:
        if v is not None and v != "none":
            raise ValueError("function_call (deprecated) is not supported; use tool_choice")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _logprobs_flag(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return v

    def engine_sampling(self) -> dict[str, Any]:
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self.sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    # The legacy endpoint's default, as in OpenAI's API.
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LEGACY_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _not_empty(
        cls, v: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        if isinstance(v, list) and not v:
            raise ValueError("must not be an empty list")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v != info.data.get("n"):
            raise ValueError("best_of other than n is not supported")
        return v

    def engine_sampling(self) -> dict[str, Any]:
        return self.sampling(self.max_tokens, self.logprobs)


# Responses ---------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprobInfo(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobInfo(TopLogprobInfo):
    top_logprobs: list[TopLogprobInfo]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobInfo] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    #: The thought of a model that thinks (vLLM's and DeepSeek's field).
    reasoning_content: str | None = None
    tool_calls: list[ToolCallInfo] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zse"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
