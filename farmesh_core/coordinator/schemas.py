"""Request bodies of the OpenAI API the coordinator serves, and its error objects.

Bodies are validated in two passes. Pydantic checks the shape (required fields, JSON types, strict:
``"5"`` is not a number); a wrong shape is a 422. ``sampling_options`` then checks the values
(``n``, ranges of ``max_tokens``, ``temperature``, ``top_p``...); a bad value is a 400. Both give
OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``. Unknown fields are
accepted and ignored, as OpenAI clients send many optional ones.
"""

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

MAX_STOP_SEQUENCES = 4


class APIError(Exception):
    """An error answered as OpenAI's error object with HTTP ``status``."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not in OpenAI's API; vLLM and llama.cpp accept it too
    min_tokens: int | None = None  # vLLM's: no end of sequence before this many tokens
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    user: str | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int]
    echo: bool | None = False


class ChatMessage(_Body):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass
class SamplingOptions:
    """What one generation needs, checked; ``max_tokens`` None means "as many as the context holds"."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    min_tokens: int = 0


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise APIError(400, message, param=param, code="invalid_value")


GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}


def sampling_options(request: _Sampling, default_max_tokens: int | None, defaults: dict = GREEDY) -> SamplingOptions:
    """The request's sampling values, or an APIError(400) naming the first bad one. What the request
    leaves out comes from ``defaults`` (the model's generation config)."""
    n = 1 if request.n is None else request.n
    _check(n == 1, "n", f"n must be 1 (one choice per request); got {n}")
    max_tokens = request.max_tokens
    if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None:
        max_tokens = request.max_completion_tokens
    if max_tokens is None:
        max_tokens = default_max_tokens
    _check(max_tokens is None or max_tokens >= 1, "max_tokens", f"max_tokens must be at least 1; got {max_tokens}")
    temperature = defaults["temperature"] if request.temperature is None else request.temperature
    _check(0 <= temperature <= 2, "temperature", f"temperature must be between 0 and 2; got {temperature}")
    top_p = defaults["top_p"] if request.top_p is None else request.top_p
    _check(0 <= top_p <= 1, "top_p", f"top_p must be between 0 and 1; got {top_p}")
    top_k = defaults["top_k"] if request.top_k is None else 0 if request.top_k == -1 else request.top_k
    _check(top_k >= 0, "top_k", f"top_k must be 0 or more (-1 or 0: no limit); got {top_k}")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    _check(len(stop) <= MAX_STOP_SEQUENCES, "stop", f"stop may hold at most {MAX_STOP_SEQUENCES} sequences")
    _check(all(stop), "stop", "stop sequences must not be empty")
    _check(not request.logprobs, "logprobs", "logprobs are not supported by this server")
    min_tokens = request.min_tokens or 0
    _check(min_tokens >= 0, "min_tokens", f"min_tokens must be 0 or more; got {min_tokens}")
    _check(max_tokens is None or min_tokens <= max_tokens, "min_tokens", "min_tokens must not exceed max_tokens")
    if top_p == 0:  # OpenAI accepts 0: only the most likely token remains
        temperature = 0.0
    return SamplingOptions(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p or 1.0, top_k=top_k, stop=stop,
        seed=request.seed, stream=bool(request.stream), min_tokens=min_tokens,
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )  # fmt: skip


def message_text(message: ChatMessage, index: int) -> str:
    """The text of a chat message; content parts other than text are refused."""
    param = f"messages[{index}]"
    if message.role not in CHAT_ROLES:
        raise APIError(400, f"{param}.role must be one of {sorted(CHAT_ROLES)}; got {message.role!r}", param=param)
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"{param}.content: only text parts are supported", param=f"{param}.content")
        texts.append(part["text"])
    return "".join(texts)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_type_tag(part) -> bool:
    """Pydantic names the member of a union in ``loc`` (``str``, ``list[int]``, ``ChatMessage``)."""
    if isinstance(part, int):
        return False
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's RequestValidationError as OpenAI's error object: 400 for JSON that does not parse,
    else 422 naming the first field that is missing or of the wrong type."""
    first = errors[0] if errors else {"type": "missing", "loc": ("body",), "msg": "a JSON body is required"}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)) or None
    if first.get("type") == "missing":
        message = f"missing required parameter: {param or 'body'}"
        code = "missing_required_parameter"
    else:
        message = f"invalid type for {param or 'body'}: {first.get('msg')}"
        code = "invalid_type"
    return APIError(422, message, param=param, code=code)
