"""The OpenAI-compatible request and response bodies of `lcc run serve`: validation into the engine's
sampling parameters (every rejection an `ApiError` with OpenAI's error body), the chat template of
byte-level models, and the response and stream-chunk objects."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lcc.serve.sampling import SamplingParams

# A byte-level model has no chat tokens of its own: each message is a line "<|role|>" and its content on
# the following lines, then "<|assistant|>" where the reply begins.
CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
ASSISTANT = "<|assistant|>\n"


class ApiError(Exception):
    """A request refused with OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # other OpenAI fields are accepted and ignored
    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: int | None = Field(None, ge=1, le=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: Literal[False] | None = None


def parse(body: bytes, kind: type[_Common]) -> _Common:
    """The request body as `kind`, or ApiError 400 naming what is wrong (bad UTF-8, bad JSON, a field)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


def chat_prompt(messages: list[Message]) -> str:
    return "".join(CHAT_TEMPLATE.format(role=m.role, content=m.content) for m in messages) + ASSISTANT


def sampling(req: _Common, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                          stop=[s for s in req.stops() if s])


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(key: int, model: str, chat: bool, text: str, reason: str | None, prompt: int, completion_tokens: int,
               created: int) -> dict[str, Any]:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        return {"id": f"chatcmpl-{key}", "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": usage(prompt, completion_tokens)}
    return {"id": f"cmpl-{key}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
            "usage": usage(prompt, completion_tokens)}


def chunk(key: int, model: str, chat: bool, text: str | None, reason: str | None, created: int,
          first: bool = False) -> dict[str, Any]:
    """One streamed chunk (text None: the final usage chunk's empty choices are set by the caller)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {"content": text or ""}
        if reason is not None and not text:
            delta = {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"id": f"chatcmpl-{key}", "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    return {"id": f"cmpl-{key}", "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def now() -> int:
    return int(time.time())
