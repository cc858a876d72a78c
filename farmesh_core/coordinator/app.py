"""The Far Mesh Coordinator's HTTP API: OpenAI's completions, chat completions and models, plus
``/health``, ``/v1/mesh`` (what ``farmesh status --json`` prints) and ``/metrics`` (Prometheus).

Generations run in a thread pool, one thread each (and one inference session, or a row of one shared
with requests that started with it), never on the event loop: the loop only moves tokens from the
worker threads to the HTTP responses.
"""

import asyncio
import contextvars
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from farmesh_core import __version__, metrics
from farmesh_core.coordinator.engine import GenerationTimer, MeshEngine, Token
from farmesh_core.coordinator.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingOptions,
    message_text,
    sampling_options,
    validation_error,
)
from farmesh_core.errors import FarMeshError, NoRouteError, RemoteError, RequestError

logger = logging.getLogger(__name__)

_END = object()  # a worker thread's last word


def api_error_for(error: BaseException) -> APIError:
    """The OpenAI-style error a failure of the mesh or of the server is answered with."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, NoRouteError):
        return APIError(503, str(error), type="service_unavailable_error", code="mesh_incomplete")
    if isinstance(error, RequestError):
        return APIError(400, str(error), code="refused_by_node")
    if isinstance(error, RemoteError | FarMeshError):
        return APIError(503, str(error), type="service_unavailable_error", code="mesh_error")
    logger.error("Unexpected error while serving a request", exc_info=error)
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")


def error_response(error: APIError, endpoint: str | None = None) -> JSONResponse:
    if endpoint is not None:
        metrics.coordinator_request(endpoint, error.status)
    return JSONResponse(error.body(), status_code=error.status)


class Generation:
    """One request's generation in a worker thread, its tokens handed to the event loop one by one."""

    def __init__(self, tokens: Iterator[Token], loop: asyncio.AbstractEventLoop):
        self._tokens, self._loop = tokens, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): stop generating
            self._cancelled.set()

    def work(self) -> None:
        """Runs in a worker thread: generate until done, failed or cancelled, then end the generation."""
        metrics.COORDINATOR_ACTIVE.inc()
        try:
            for token in self._tokens:
                self._put(token)
                if self._cancelled.is_set():
                    break
        except BaseException as e:
            self._put(e)
        finally:
            self._tokens.close()
            metrics.COORDINATOR_ACTIVE.dec()
            self._put(_END)

    def cancel(self) -> None:
        self._cancelled.set()

    async def next(self) -> Token | None:
        """The next token, None at the end; raises what the generation raised."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item


def create_app(engine: MeshEngine, max_concurrent: int = 16) -> FastAPI:
    """The FastAPI app serving ``engine``'s model; at most ``max_concurrent`` generations run at once
    (more wait for a free worker)."""
    pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="farmesh-generate")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="Far Mesh Coordinator", version=__version__, lifespan=lifespan)
    app.state.engine = engine

    # ---- errors: always OpenAI's error object, never a trace --------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error_response(error, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        return error_response(validation_error(list(error.errors())), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, type=kind, code=code))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        return error_response(api_error_for(error), request.url.path)

    # ---- generation -------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if not engine.serves(name):
            raise APIError(
                404, f"The model '{name}' does not exist; this coordinator serves '{engine.model_name}'",
                param="model", code="model_not_found",
            )  # fmt: skip

    async def start(prompt_ids: list[int], options: SamplingOptions) -> tuple[Generation, Token | None]:
        """Start a generation and wait for its first token, so that a mesh without a route (or a node
        that refuses the request) is answered with an HTTP error, not a broken stream."""
        max_tokens = engine.check_length(prompt_ids, options)
        generation = Generation(engine.generate(prompt_ids, max_tokens, options), asyncio.get_running_loop())
        # (in this request's context: its announcement, see ``announced``, ends where the worker arrives)
        asyncio.get_running_loop().run_in_executor(pool, contextvars.copy_context().run, generation.work)
        try:
            first = await generation.next()
        except BaseException:
            generation.cancel()
            raise
        return generation, first

    def announced(endpoint):
        """Announce the request's generation to the client's batcher (``GenerationBatcher.announce``)
        from the moment it reaches ``endpoint``: requests sent together are parsed and tokenized one
        after another, and a window opened by the first waits for those still on their way, so that
        they share a session."""

        @functools.wraps(endpoint)
        async def announcing(body):
            with engine.client.batcher.announce():
                return await endpoint(body)

        return announcing

    async def tokens_of(generation: Generation, first: Token | None) -> AsyncIterator[Token]:
        token = first
        try:
            while token is not None:
                yield token
                token = await generation.next()
        finally:
            generation.cancel()  # the client left, or we are done: the worker ends the generation

    async def complete(endpoint: str, prompt_ids: list[int], options: SamplingOptions, render) -> Response:
        """Run one generation; ``render(kind, **fields)`` makes the OpenAI objects of ``endpoint``."""
        timer = GenerationTimer()
        try:
            generation, first = await start(prompt_ids, options)
        except Exception as e:
            return error_response(api_error_for(e), endpoint)
        if not options.stream:
            pieces, finish = [], "stop"
            try:
                async for token in tokens_of(generation, first):
                    timer.token()
                    pieces.append(token.text)
                    finish = token.finish_reason or finish
            except Exception as e:
                return error_response(api_error_for(e), endpoint)
            usage = usage_of(len(prompt_ids), timer.tokens)
            record(endpoint, 200, timer, len(prompt_ids))
            return JSONResponse(render("full", text="".join(pieces), finish_reason=finish, usage=usage))
        return StreamingResponse(
            stream(endpoint, generation, first, options, timer, len(prompt_ids), render),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stream(endpoint, generation, first, options, timer, prompt_tokens, render) -> AsyncIterator[str]:
        """Server-sent events: a chunk per token, one with the finish reason, usage if asked, [DONE]."""
        finish, status = "stop", 200
        try:
            opening = render("opening")
            if opening is not None:
                yield sse(opening)
            async for token in tokens_of(generation, first):
                timer.token()
                yield sse(render("chunk", text=token.text))
                finish = token.finish_reason or finish
            yield sse(render("chunk", text="", finish_reason=finish))
            if options.include_usage:
                yield sse(render("usage", usage=usage_of(prompt_tokens, timer.tokens)))
        except Exception as e:  # headers are sent: the error goes in the stream, as OpenAI does
            error = api_error_for(e)
            status = error.status
            yield sse(error.body())
        finally:
            record(endpoint, status, timer, prompt_tokens)
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    @announced
    async def completions(body: CompletionRequest):
        check_model(body.model)
        options = sampling_options(body, 16, engine.sampling_defaults)  # 16: OpenAI's default for completions
        prompt = body.prompt
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt) and prompt:
            if len(prompt) > 1:
                raise APIError(400, "give one prompt per request (a string)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await asyncio.to_thread(engine.encode, prompt)
        else:
            prompt_ids = list(prompt)
            vocab = engine.client.model_config.vocab_size
            if not all(0 <= t < vocab for t in prompt_ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        echo = body.echo and not options.stream
        prefix = await asyncio.to_thread(engine.decode, prompt_ids) if echo else ""
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def render(kind: str, text: str = "", finish_reason=None, usage=None) -> dict | None:
            base = {"id": ident, "object": "text_completion", "created": created, "model": body.model}
            if kind == "opening":
                return None
            if kind == "usage":
                return {**base, "choices": [], "usage": usage}
            choice = {"index": 0, "text": prefix + text, "logprobs": None, "finish_reason": finish_reason}
            out = {**base, "choices": [choice]}
            if kind == "full":
                out["usage"] = usage
            return out

        return await complete("/v1/completions", prompt_ids, options, render)

    @app.post("/v1/chat/completions")
    @announced
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        options = sampling_options(body, None, engine.sampling_defaults)  # None: as many as the context holds
        if not body.messages:
            raise APIError(400, "messages must hold at least one message", param="messages")
        messages = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(body.messages)]
        prompt_ids = await asyncio.to_thread(engine.chat_prompt_ids, messages)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def render(kind: str, text: str = "", finish_reason=None, usage=None) -> dict:
            base = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model}
            if kind == "opening":
                delta = {"role": "assistant", "content": ""}
                return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
            if kind == "usage":
                return {**base, "choices": [], "usage": usage}
            if kind == "chunk":
                delta = {"content": text} if finish_reason is None else {}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                return {**base, "choices": [choice]}
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

        return await complete("/v1/chat/completions", prompt_ids, options, render)

    # ---- the rest ---------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "farmesh"}

    @app.get("/v1/models")
    async def models():
        metrics.coordinator_request("/v1/models", 200)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        metrics.coordinator_request("/v1/models/{name}", 200)
        return model_card()

    @app.get("/v1/mesh")
    async def mesh():
        """The same data as ``farmesh status --json``."""
        try:
            status = await asyncio.to_thread(engine.mesh_status)
        except Exception as e:
            return error_response(api_error_for(e), "/v1/mesh")
        metrics.coordinator_request("/v1/mesh", 200)
        return status

    @app.get("/health")
    async def health():
        """200 while the coordinator runs; ``status`` says whether the mesh covers every layer now."""
        try:
            status = await asyncio.to_thread(engine.mesh_status)
            missing, nodes = status["missing_layers"], sum(n["state"] == "online" for n in status["nodes"])
        except Exception as e:
            logger.warning("Could not read the mesh for /health: %r", e)
            missing, nodes = None, 0
        return {
            "status": "ok" if missing == [] else "degraded",
            "model": engine.model_name,
            "num_layers": engine.client.num_layers,
            "online_nodes": nodes,
            "missing_layers": missing,
            "version": __version__,
        }

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.metrics_text()
        return Response(body, media_type=content_type)

    return app


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def record(endpoint: str, status: int, timer: GenerationTimer, prompt_tokens: int) -> None:
    metrics.coordinator_request(endpoint, status, timer.elapsed())
    metrics.coordinator_tokens(prompt_tokens, timer.tokens)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
