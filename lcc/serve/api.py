"""The OpenAI-compatible request and response bodies of `lcc run serve`: validation into the engine's
sampling parameters (every rejection an `ApiError` with OpenAI's error body), the chat template of
byte-level models, and the response and stream-chunk objects.

Every field is bounded before anything reaches the engine: a seed in [0, 2**64), temperature in [0, 2],
top_p in (0, 1], max_tokens within the context (the server checks it against the prompt), at most
`MAX_STOPS` stop strings of at most `MAX_STOP_CHARS` characters each, and a body of at most `body_limit`
bytes."""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from lcc.serve.sampling import SEEDS, SamplingParams

# A byte-level model has no chat tokens of its own: each message is a line "<|role|>" and its content on
# the following lines, then "<|assistant|>" where the reply begins.
CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
ASSISTANT = "<|assistant|>\n"

MAX_STOPS = 16  # stop strings per request: each is searched for at every token
MAX_STOP_CHARS = 256  # characters per stop string: as many are held back from a stream
MIN_BODY_LIMIT = 2**20  # bytes; more for a long context (body_limit)


def body_limit(max_seq_len: int) -> int:
    """The largest request body taken: 1 MiB, or 64 bytes per token of the context where that is more (a
    prompt as token ids, or text with escapes, takes several bytes per token)."""
    return max(MIN_BODY_LIMIT, 64 * max_seq_len)


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


class RequestBody(BaseModel):
    """What completions and chat requests share: the model, the sampling fields and streaming."""
    model_config = ConfigDict(extra="allow", strict=True)  # other OpenAI fields are accepted and ignored
    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=SEEDS)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    return_routed_experts: bool = False  # lcc's: each generated token's experts per MoE layer
    return_token_ids: bool = False  # the prompt's token ids and each choice's generated ids (as vLLM's)
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (lcc.serve.structured)
    guided_regex: str | None = None  # the text matches this regular expression
    guided_grammar: str | None = None  # the text follows this Lark grammar (llguidance's dialect)

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        many = [v] if isinstance(v, str) else v or []
        if len(many) > MAX_STOPS:
            raise PydanticCustomError("too_many_stops", "at most {most} stop strings, not {n}",
                                      {"most": MAX_STOPS, "n": len(many)})
        longest = max(many, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise PydanticCustomError("stop_too_long", "a stop string has {n} characters; at most {most} are taken",
                                      {"most": MAX_STOP_CHARS, "n": len(longest)})
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(RequestBody):
    prompt: str | list[int]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: int | None = Field(None, ge=1, le=1)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(RequestBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: Literal[False] | None = None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse(body: bytes, kind: type[RequestBody]) -> RequestBody:
    """The request body as `kind`, or ApiError 400 naming what is wrong (bad UTF-8, bad JSON, a field)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_not_json)  # NaN and Infinity are Python's, not JSON's
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") \
            from None
    except (ValueError, RecursionError) as exc:  # NaN, an integer of thousands of digits, deep nesting
        why = str(exc) if isinstance(exc, ValueError) else "it is nested too deeply"
        raise ApiError(400, f"the request body is not valid JSON: {why}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise ApiError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


def server_error(message: str) -> dict[str, Any]:
    """OpenAI's error body for a request that failed while it was served."""
    return ApiError(500, message, kind="server_error").body()


def chat_prompt(messages: list[Message]) -> str:
    return "".join(CHAT_TEMPLATE.format(role=m.role, content=m.content) for m in messages) + ASSISTANT


def structure(req: RequestBody) -> tuple[str, str, Any] | None:
    """What the request's text must follow: (the field that says so, a kind of lcc.serve.structured.KINDS, its
    schema or text), or None; ApiError 400 for a response_format of the wrong shape or more than one ask."""
    asked = []
    fmt = req.response_format
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            asked.append(("response_format", "json_object", None))
        elif kind == "json_schema":
            inner = fmt.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, dict) else None
            if not isinstance(schema, dict):
                raise ApiError(400, "response_format.json_schema.schema: a JSON schema (an object) is required",
                               "response_format.json_schema.schema")
            asked.append(("response_format.json_schema.schema", "json_schema", schema))
        elif kind != "text":
            raise ApiError(400, f"response_format.type: {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                           "response_format.type")
    if req.guided_regex is not None:
        asked.append(("guided_regex", "regex", req.guided_regex))
    if req.guided_grammar is not None:
        asked.append(("guided_grammar", "grammar", req.guided_grammar))
    if len(asked) > 1:
        raise ApiError(400, f"{asked[1][0]}: only one of response_format, guided_regex and guided_grammar is taken",
                       asked[1][0])
    return asked[0] if asked else None


def sampling(req: RequestBody, max_tokens: int, grammar: str | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                          stop=[s for s in req.stops() if s], return_routed_experts=req.return_routed_experts,
                          grammar=grammar)


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Extras:
    """What a request asked for besides the text: `return_token_ids` (the prompt's ids, once, and the
    generated ids) and `return_routed_experts` (per generated token, per MoE layer: the experts it chose).
    Updates are added as they come; `take` hands out what came since it was last called."""

    def __init__(self, req: RequestBody, prompt: list[int]):
        self.prompt = list(prompt) if req.return_token_ids else None
        self.tokens: list[int] | None = [] if req.return_token_ids else None
        self.routed: list[list[list[int]]] | None = [] if req.return_routed_experts else None

    def add(self, token_ids: list[int], routed: list | None) -> None:
        if self.tokens is not None:
            self.tokens += token_ids
        if self.routed is not None:
            self.routed += routed or []

    def take(self) -> dict[str, Any]:
        """The choice's fields of what was added since the last take (the prompt's ids the first time)."""
        out: dict[str, Any] = {}
        if self.tokens is not None:
            out["token_ids"], self.tokens = self.tokens, []
        if self.routed is not None:
            out["routed_experts"], self.routed = self.routed, []
        return out

    def prompt_ids(self) -> dict[str, Any]:
        out, self.prompt = ({"prompt_token_ids": self.prompt} if self.prompt is not None else {}), None
        return out


def completion(key: int, model: str, chat: bool, text: str, reason: str | None, prompt: int, completion_tokens: int,
               created: int, extras: Extras | None = None) -> dict[str, Any]:
    """`extras`: the choice's `token_ids` and `routed_experts`, and `prompt_token_ids`, where asked for."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason}
        out = {"id": f"chatcmpl-{key}", "object": "chat.completion", "created": created, "model": model,
               "choices": [choice], "usage": usage(prompt, completion_tokens)}
    else:
        out = {"id": f"cmpl-{key}", "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
               "usage": usage(prompt, completion_tokens)}
    if extras is not None:
        out.update(extras.prompt_ids())
        out["choices"][0].update(extras.take())
    return out


def chunk(key: int, model: str, chat: bool, text: str | None, reason: str | None, created: int,
          first: bool = False, extras: Extras | None = None) -> dict[str, Any]:
    """One streamed chunk (text None: the final usage chunk's empty choices are set by the caller); `extras`:
    what the request asked for of the tokens since the last chunk (the prompt's ids with the first)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {"content": text or ""}
        if reason is not None and not text:
            delta = {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        out = {"id": f"chatcmpl-{key}", "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [choice]}
    else:
        out = {"id": f"cmpl-{key}", "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}
    if extras is not None:
        out.update(extras.prompt_ids())
        out["choices"][0].update(extras.take())
    return out


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def now() -> int:
    return int(time.time())
