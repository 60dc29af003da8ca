"""The OpenAI wire format `selfevolve serve` accepts: the request bodies, validated by pydantic
so a malformed request is a 400 with one line, never a 500. Extra fields that OpenAI clients
send are accepted and ignored (vLLM's `return_tokens_as_token_ids` and selfevolve's
`refine`, `reference`, `tests`, `entry_point` are read); a field that would change the answer
and cannot be honoured (`tools`, a `response_format` other than text) is refused, never
ignored; the feedback body is strict."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator


def _encodable(text: str) -> str:
    """Text a tokenizer can take: a lone surrogate (JSON's "\\ud800") is refused, not a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode (a lone surrogate at {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
SEED = Field(None, ge=-(2**63), lt=2**64)  # what torch.manual_seed takes
PRIORITY = Field(0, ge=-(2**31), lt=2**31)  # vLLM's: lower is answered sooner (serve: a queue class)


class Message(BaseModel):
    """A chat message; `content` as a string or as the list of text parts the openai SDK's
    typed messages and LangChain send (joined; other part types are refused)."""

    model_config = ConfigDict(extra="ignore")
    role: str = Field(pattern="^(system|user|assistant)$")
    content: Text

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, value):
        if not isinstance(value, list):
            return value
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return "".join(p["text"] for p in value)


class Refine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_turns: int | None = Field(None, ge=1)
    critic: str | None = Field(None, pattern="^(none|self|verifier|judge)$")
    reference: str | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = SEED
    priority: int = PRIORITY
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)  # with logprobs: the k most likely tokens at each step
    return_tokens_as_token_ids: bool = False  # vLLM's: tokens as "token_id:N", for a learner to match
    stream: bool | None = False  # server-sent events as the tokens are generated
    stop: Text | list[Text] | None = Field(None, max_length=4)
    response_format: dict | None = None  # only {"type": "text"}: anything else is refused, not ignored
    tools: list | None = None  # refused: the served model has no tool-calling format
    tool_choice: Any = None
    refine: Refine | bool | None = None
    reference: Text | None = None  # extra_body: the expected answer, for the verifier's score in the trace
    tests: list[str] | str | None = None  # extra_body: a code task's tests ...
    entry_point: str | None = None  # ... and the function they call


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    prompt: Text | list[Text] | list[int] | list[list[int]]  # texts, or token ids (lm-eval sends these)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(16, ge=0)  # 0: with echo, the prompt alone (its log-probs score it)
    n: int = Field(1, ge=1)
    seed: int | None = SEED
    priority: int = PRIORITY
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool | None = False
    stop: Text | list[Text] | None = Field(None, max_length=4)
    reference: str | None = None  # extra_body, as in ChatRequest
    tests: list[str] | str | None = None
    entry_point: str | None = None


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a verdict on a logged answer, given after the fact."""

    model_config = ConfigDict(extra="forbid")
    trace_id: str = Field(min_length=1, max_length=64)
    score: float = Field(ge=0, le=1, allow_inf_nan=False)
    text: str | None = Field(None, max_length=20_000)


class LoadAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str | None = None
    load_inplace: bool = False  # vLLM's: replace the adapter loaded under this name (else a used name is refused)

