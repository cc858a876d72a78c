"""The RPC handlers of a Far Node: every network input is validated before any compute.

A refused request gets an error reply naming the problem; the node, and every other session, keep
going. Small steps (decoding, short prefills) run inline on the event loop on one torch thread, the
fastest path here (a hand-off to another thread costs more than it saves), except the matmuls of a
lone one-token step, which are split over ``num_threads`` (see ``row_matmul.row_blocks``), and a short
prefill of the node's only session while the node is warm (``WARM_S``) or when it is heavy
(``LARGE_PREFILL``), and any short step whose bits one thread would change, which use ``num_threads``;
large ones (long prefills, forward, backward) run off the loop with ``num_threads`` torch threads, so
they use every core and do not stall other sessions' messages.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import partial

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from farmesh_core import metrics
from farmesh_core.config import NodeConfig
from farmesh_core.errors import RequestError
from farmesh_core.extensions import AuthProvider, PaymentLedger, UsageEvent
from farmesh_core.node.batching import DecodeBatcher
from farmesh_core.node.direct_lane import DirectLane
from farmesh_core.node.kv_cache import KVCacheBudget, SessionCache
from farmesh_core.node.layer_span import LayerSpan
from farmesh_core.node.push import PushInboxes, PushLinks, push_server
from farmesh_core.node.row_groups import RowGroups
from farmesh_core.node.streams import add_limited_stream_handler
from farmesh_core.node.token_loop import NodeHead, TurnAsk, next_turn
from farmesh_core.openmp import on_spread_team, release_worker_threads, set_thread_count, spreads, torch_threads
from farmesh_core.wire import (
    ErrorReply,
    FarNodeRPC,
    InferenceStep,
    OpenSession,
    SpanCall,
    StepReply,
    WireTensor,
    all_finite,
    chunked_messages,
    decode_meta,
    deserialize_tensor,
    encode_meta,
    receive_chunked,
    tensor_message,
    wire_tensor,
)

logger = logging.getLogger(__name__)

INLINE_TOKENS = 128  # steps with at most this many tokens run on the event loop
# Where a step's threads cannot have CPUs of their own (openmp.spreads), an inline prefill uses
# ``num_threads`` only if the node's event loop ran torch ops on several threads (a split one-token
# step, such a prefill) within this long: in-process, 34 tokens through 4 layers on 2 threads took
# 2.6-3.5 ms after 1-12 ms of sleep, 5.1 after 15 and 21 after 18 or more (one thread: 3.6-5.0), as
# the kernel of this VM stacked the team's threads on one CPU. With CPUs of their own, 3.4-3.5 ms
# after 20-500 ms of sleep, against 4.2-4.4 on one thread.
WARM_S = 0.012
# ...or if it is this large (tokens x bytes of the layers' weights; ~1.5 GFLOP in float32, ~40 ms on
# one thread here): waking the other cores then costs less than the second thread saves.
LARGE_PREFILL = 3 * 1024**3


def error_response(error: Exception) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=encode_meta(ErrorReply(error=str(error)[:4000])))


@dataclass
class _Sent:
    """A step's output as sent on (``NodeHandlers._send_on``): its wire form, the token its turn chose,
    and whether it went on to the next node."""

    proto: WireTensor
    token: int | None = None
    pushed: bool = False


def _then_release(fn, *args):
    try:
        return fn(*args)
    finally:
        release_worker_threads()


class NodeHandlers:
    """Serves one LayerSpan to the Far Mesh Network."""

    def __init__(
        self,
        config: NodeConfig,
        span: LayerSpan,
        auth: AuthProvider,
        ledger: PaymentLedger,
        peer_id: str = "",
    ):
        self.config, self.span, self.auth, self.ledger, self.peer_id = config, span, auth, ledger, peer_id
        self.budget = KVCacheBudget(config.kv_cache_bytes, config.kv_cache_peer_share)
        self.active_sessions = 0
        self._threaded_at = 0.0  # when the event loop last ran a prefill on several threads
        self.record_json = b"{}"
        self._threads = threads = config.num_threads or torch.get_num_threads()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="farmesh-compute", initializer=set_thread_count, initargs=(threads,)
        )
        self.row_groups = RowGroups(threads)
        self.batcher = DecodeBatcher(
            span, sessions=lambda: self.active_sessions, turns=self._choose_turns, together=self._pushes_together
        )
        self.direct_lane: DirectLane | None = None
        self.pushes: PushLinks | None = None  # set by the FarNode once it is on the mesh
        self.push_inboxes = PushInboxes()
        self.head: NodeHead | None = None  # where it serves the last layer: see token_loop.py
        metrics.watch_node(self)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.row_groups.close()

    STREAM_RPCS = ("rpc_inference", "rpc_forward", "rpc_backward")

    async def register(self, p2p) -> None:
        """Serve the FarNodeRPC methods on ``p2p`` (and on the direct lane, unless it is off); streams
        check each message's size before reading it."""
        servers = {}
        for method in self.STREAM_RPCS:
            name = FarNodeRPC._get_handle_name(None, method)
            servers[method] = await add_limited_stream_handler(
                p2p, name, getattr(self, method), runtime_pb2.ExpertRequest, self.config.max_message_bytes
            )
        await p2p.add_protobuf_handler(
            FarNodeRPC._get_handle_name(None, "rpc_info"), self.rpc_info, runtime_pb2.ExpertUID
        )
        if self.config.direct_lane:
            servers["rpc_push"] = push_server(self.push_inboxes, self.config.max_message_bytes)
            self.direct_lane = DirectLane(servers, self.config.listen_host())
            await self.direct_lane.start()
            await p2p.add_protobuf_handler(
                FarNodeRPC._get_handle_name(None, "rpc_direct_ticket"),
                self.direct_lane.rpc_direct_ticket,
                runtime_pb2.ExpertUID,
            )

    async def unregister(self, p2p) -> None:
        if self.pushes is not None:
            self.pushes.close()
        for method in self.STREAM_RPCS:
            await p2p.remove_binary_stream_handler(FarNodeRPC._get_handle_name(None, method))
        await p2p.remove_protobuf_handler(FarNodeRPC._get_handle_name(None, "rpc_info"))
        if self.direct_lane is not None:
            await self.direct_lane.stop()
            await p2p.remove_protobuf_handler(FarNodeRPC._get_handle_name(None, "rpc_direct_ticket"))

    # ---- validation --------------------------------------------------------------------------
    def _check_layers(self, start: int, end: int, adapter: str | None) -> None:
        if not (self.span.start <= start < end <= self.span.end):
            raise RequestError(
                f"layers {start}:{end} are not within this node's span {self.span.start}:{self.span.end}"
            )
        if adapter is not None and adapter not in self.config.adapter_names:
            raise RequestError(f"adapter {adapter!r} is not loaded on this node (has: {self.config.adapter_names})")

    def _check_hidden(self, proto: WireTensor, batch_size: int | None = None) -> torch.Tensor:
        hidden = deserialize_tensor(proto, max_numel=self.config.max_tokens_per_request * self.span.hidden_size)
        if hidden.ndim != 3 or hidden.shape[2] != self.span.hidden_size or hidden.shape[1] == 0:
            raise RequestError(
                f"hidden states must have shape [batch, seq>0, {self.span.hidden_size}], got {list(hidden.shape)}"
            )
        if batch_size is not None and hidden.shape[0] != batch_size:
            raise RequestError(f"batch of {hidden.shape[0]} in a session opened for {batch_size}")
        if not 0 < hidden.shape[0] <= self.config.max_batch_size:
            raise RequestError(f"batch of {hidden.shape[0]} exceeds the limit of {self.config.max_batch_size}")
        if hidden.shape[0] * hidden.shape[1] > self.config.max_tokens_per_request:
            raise RequestError(f"a step may carry at most {self.config.max_tokens_per_request} tokens")
        if not all_finite(hidden):
            raise RequestError("hidden states contain NaN or infinity")
        return hidden

    async def _compute(self, tokens: int, layers: int, fn, *args, split: int = 0):
        """``fn(*args)``, a step of ``tokens`` tokens through ``layers`` layers (``fn``: the span's
        forward, ``args[0]`` its hidden states): see INLINE_TOKENS, WARM_S and LARGE_PREFILL; ``split``
        as in _on_worker. A one-row step of a token count whose bits one thread would change runs on
        the node's threads (``_one_thread_keeps_bits``)."""
        if tokens > INLINE_TOKENS:
            return await self._on_worker(fn, *args, split=split)
        warm = spreads(self._threads) or time.perf_counter() - max(self._threaded_at, self.batcher.split_at) <= WARM_S
        heavy = tokens * layers * self.span.layer_bytes >= LARGE_PREFILL
        if (self.active_sessions > 1 or not (warm or heavy)) and self._one_thread_keeps_bits(args[0]):
            return fn(*args)
        with torch_threads(self._threads):  # a prompt on a node that is warm and serves it alone
            out = fn(*args)
        self._threaded_at = time.perf_counter()
        return out

    def _one_thread_keeps_bits(self, hidden: torch.Tensor) -> bool:
        """Whether a step of ``hidden`` [rows, tokens, hidden] may run on one thread: its bits are those
        of the node's threads (else its output would hang on the node's state, and could differ from
        what ``transformers`` computes on as many threads; see ``LayerSpan.same_bits_on_one_thread``).
        Checked for one row; steps of several rows (shared sessions' decode steps, batched forwards)
        take paths of their own and stay as they were."""
        if self._threads == 1 or hidden.shape[0] > 1:
            return True
        return self.span.same_bits_on_one_thread(hidden.shape[1], self._threads)

    async def _on_worker(self, fn, *args, split: int = 0):
        """``fn(*args)`` with ``num_threads`` torch threads, off the event loop, after the large steps
        before it. The loop's OpenMP threads (of split one-token steps) end before it and the worker's
        after it, so that it has the only team and spins between its parallel regions (see openmp.py).
        With ``split``, fn's first ``split`` arguments are tensors whose rows it treats independently
        (no cache), which run in groups at once (see row_groups.py); a step run whole keeps its team's
        threads apart (openmp.spread_team)."""
        release_worker_threads()
        if split and not self.span.switchable:  # (LoRA layers switch adapters under a lock: one group at a time)
            fn = partial(self.row_groups.run, fn, split)
        else:
            fn = partial(on_spread_team, self._threads, fn)
        return await asyncio.get_running_loop().run_in_executor(self._executor, _then_release, fn, *args)

    def _record_usage(
        self, client: str, session: str, start: int, end: int, tokens: int, prefill: bool, began, peer: str = ""
    ):
        elapsed = time.perf_counter() - began
        metrics.node_step(tokens, prefill, elapsed)
        event = UsageEvent(
            node=self.peer_id, client=client, peer=peer, session=session, start=start, end=end,
            prefill_tokens=tokens if prefill else 0, decode_tokens=0 if prefill else tokens,
            compute_s=elapsed,
        )  # fmt: skip
        try:
            self.ledger.record(event)
        except Exception:
            logger.exception("The payment ledger failed to record a usage event")

    # ---- inference sessions ------------------------------------------------------------------
    @asynccontextmanager
    async def _session(self, request: OpenSession, context: P2PContext):
        self._check_layers(request.start, request.end, request.adapter)
        if request.max_length > self.config.max_session_length:
            raise RequestError(
                f"max_length {request.max_length} exceeds {self.config.max_session_length}, the most tokens this "
                "node holds for one session (the prompt and the new tokens together): ask for fewer new tokens"
            )
        if request.batch_size > self.config.max_batch_size:
            raise RequestError(f"batch_size {request.batch_size} exceeds {self.config.max_batch_size}")
        client = self.auth.verify(request.credentials, str(context.remote_id))
        if request.max_length * request.batch_size > self.config.max_session_length * self.config.max_batch_size:
            raise RequestError("max_length x batch_size is too large for this node")
        nbytes = request.batch_size * request.max_length * self.span.kv_bytes_per_token(request.start, request.end)
        peer = str(context.remote_id)
        await self.budget.allocate(nbytes, request.alloc_timeout, peer)
        metrics.node_request("inference")
        cache = SessionCache(request.max_length)
        self.active_sessions += 1
        try:
            yield client, cache
        finally:
            self.active_sessions -= 1
            cache.release()
            await self.budget.release(nbytes, peer)

    @asynccontextmanager
    async def _messages(self, opened: OpenSession, requests: AsyncIterator[runtime_pb2.ExpertRequest]):
        """A function that returns the session's next message as (step, request, pushed): from the
        client's stream, and in a push session also outputs the previous node pushed (see push.py)."""
        if opened.push_key is None:

            async def from_client():
                request = await anext(requests)
                return decode_meta(request.metadata, InferenceStep), request, False

            yield from_client
            return
        inbox = self.push_inboxes.open(opened.session_id, opened.push_key)

        async def forward_client() -> None:
            try:
                async for request in requests:
                    await inbox.put((None, request))
            finally:
                with suppress(asyncio.QueueFull):
                    inbox.put_nowait((None, None))  # the client's end of stream

        async def next_message():
            step, request = await inbox.get()
            if request is None:
                raise StopAsyncIteration
            if step is None:
                return decode_meta(request.metadata, InferenceStep), request, False
            return step, request, True

        forwarding = asyncio.create_task(forward_client())
        try:
            yield next_message
        finally:
            forwarding.cancel()
            self.push_inboxes.close(opened.session_id)

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        logger.debug("Inference stream opened by %s", context.remote_id)
        try:
            async with asyncio.timeout(self.config.step_timeout):
                first = await anext(requests)
            step = decode_meta(first.metadata, InferenceStep)
            if step.open is None:
                raise RequestError("the first message of an inference stream must open the session")
            opened = step.open
            async with self._session(opened, context) as (client, cache), self._messages(opened, requests) as receive:
                request, pushed, answered = first, False, 0
                while True:
                    if request is first and not first.tensors:
                        pass  # opened ahead of its first step, which comes next (pushed, or from the client)
                    elif opened.push_key is not None and step.step <= answered:  # see InferenceStep.step
                        if not pushed:
                            raise RequestError(f"step number {step.step} after {answered}: numbers must grow")
                        logger.debug("Dropped a stale push (step %d after %d)", step.step, answered)
                    else:
                        yield await self._inference_step(opened, step, request, cache, client, context)
                        answered = step.step
                    try:
                        async with asyncio.timeout(self.config.step_timeout):
                            step, request, pushed = await receive()
                    except StopAsyncIteration:
                        return
                    if step.open is not None:
                        raise RequestError("the session is already open")
        except StopAsyncIteration:
            return
        except TimeoutError:
            yield error_response(RequestError(f"no step within {self.config.step_timeout} s; session closed"))
        except RequestError as e:
            logger.info("Refused an inference request from %s: %s", context.remote_id, e)
            yield error_response(e)

    async def _inference_step(
        self, opened: OpenSession, step: InferenceStep, request: runtime_pb2.ExpertRequest, cache: SessionCache,
        client: str, context: P2PContext,
    ) -> runtime_pb2.ExpertResponse:  # fmt: skip
        """Check and run one step of a session; its answer (pushed on to the next node if asked)."""
        if len(request.tensors) != 1:
            raise RequestError("each inference step carries exactly one tensor")
        if (step.push or step.loop) and opened.push_key is None:
            raise RequestError("only a push session (opened with push_key) may push or loop")
        turns = step.loop is not None and not step.push  # a token loop's turn is this node's (see _turn)
        if turns and (self.head is None or opened.end != self.head.num_layers or opened.batch_size != 1):
            raise RequestError(
                "this node chooses no tokens here: a token loop runs one sequence, on the node with the LM head "
                "and the model's last layer"
            )
        hidden = self._check_hidden(request.tensors[0], opened.batch_size)
        q_len = hidden.shape[1]
        if step.position > cache.length:
            raise RequestError(f"step at position {step.position} skips past {cache.length} cached tokens")
        if step.position + q_len > opened.max_length:
            raise RequestError(f"position {step.position}+{q_len} exceeds max_length {opened.max_length}")
        began = time.perf_counter()
        tokens = hidden.shape[0] * q_len
        ask = TurnAsk(step.position + q_len, step.loop) if turns else None
        sent: list[_Sent] = []
        if tokens == 1:
            out = await self.batcher.submit(
                hidden, opened.start, opened.end, cache, step.position, opened.adapter, turn=ask,
                onward=lambda output: sent.append(self._send_on(step, ask, opened.max_length, output)),
                chain=max(len(step.push) + 1, len(step.loop.ring) if step.loop else 1),
            )  # fmt: skip
        else:
            out = await self._compute(
                tokens, opened.end - opened.start,
                self.span.forward, hidden, opened.start, opened.end, cache, step.position, opened.adapter,
            )  # fmt: skip
        done = sent[0] if sent else self._send_on(step, ask, opened.max_length, out)
        response = tensor_message(runtime_pb2.ExpertResponse, done.proto)
        if opened.push_key is not None:
            response.metadata = encode_meta(StepReply(step=step.step, pushed=done.pushed, token=done.token))
        self._record_usage(
            client, opened.session_id, opened.start, opened.end, tokens, q_len > 1, began, peer=str(context.remote_id)
        )
        return response

    def _send_on(self, step: InferenceStep, ask: TurnAsk | None, max_length: int, out: torch.Tensor) -> "_Sent":
        """The step's output ``out`` sent on: pushed to the next node where the step asks, or a token
        loop's turn taken (``ask``); run by the decode batcher for a one-token step, with the rest of
        its batch (see ``DecodeBatcher``)."""
        token, pushed = None, False
        if ask is not None:  # first: the next turn waits for it
            token, pushed = self._turn(ask, max_length, out)
        proto = wire_tensor(out)
        if step.push:  # (a token loop goes on with the pushes to the node with the last layers)
            pushed = self.pushes is not None and self.pushes.push(step.push, step.position, proto, step.loop)
        return _Sent(proto, token, pushed)

    def _turn(self, ask: TurnAsk, max_length: int, out: torch.Tensor) -> tuple[int, bool]:
        """A turn of a token loop (see token_loop.py) after the step whose output is ``out``: the chosen
        token (``ask.token`` where the decode batch chose it), and whether its embedding went on to the
        first node (False where the loop ends or the push cannot be made: the client goes on then)."""
        head, loop, length = self.head, ask.loop, ask.length
        token = head.choose(out, length, loop) if ask.token is None else ask.token
        after = next_turn(loop, token, length, max_length)
        pushed = (
            after is not None
            and self.pushes is not None
            and self.pushes.push(loop.ring, length, head.embedding(token), after)
        )
        return token, pushed

    def _pushes_together(self) -> AbstractContextManager:
        return nullcontext() if self.pushes is None else self.pushes.together()

    def _choose_turns(self, outputs: list[torch.Tensor], asks: list[TurnAsk]) -> None:
        """A decode batch's token-loop turns, chosen together (see ``NodeHead.choose_rows``)."""
        if self.head is not None:
            self.head.choose_rows(outputs, asks)

    # ---- forward / backward ------------------------------------------------------------------
    def _max_call_bytes(self, tensors: int) -> int:
        return tensors * self.config.max_tokens_per_request * self.span.hidden_size * 4 + 4096

    async def _span_call(self, requests, context: P2PContext, tensors: int):
        call, protos = await asyncio.wait_for(
            receive_chunked(requests, SpanCall, self._max_call_bytes(tensors), tensors),
            self.config.step_timeout,
        )
        if len(protos) != tensors:
            raise RequestError(f"expected {tensors} tensors, got {len(protos)}")
        self._check_layers(call.start, call.end, call.adapter)
        client = self.auth.verify(call.credentials, str(context.remote_id))
        hidden = [self._check_hidden(p) for p in protos]
        if tensors == 2 and hidden[0].shape != hidden[1].shape:
            raise RequestError("the output gradient must have the same shape as the hidden states")
        return call, client, hidden

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in self._serve_span_call(requests, context, backward=False):
            yield message

    async def rpc_backward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for message in self._serve_span_call(requests, context, backward=True):
            yield message

    async def _serve_span_call(self, requests, context: P2PContext, backward: bool):
        """Forward (hidden states in, output out) or backward (hidden states and output gradient in,
        input gradient out) through the layers the call names; no session, no cache."""
        try:
            call, client, tensors = await self._span_call(requests, context, tensors=2 if backward else 1)
            metrics.node_request("backward" if backward else "forward")
            began, tokens = time.perf_counter(), tensors[0].shape[0] * tensors[0].shape[1]
            if backward:
                out = await self._on_worker(self.span.backward, *tensors, call.start, call.end, call.adapter, split=2)
            else:
                out = await self._compute(
                    tokens, call.end - call.start,
                    self.span.forward, tensors[0], call.start, call.end, None, 0, call.adapter, split=1,
                )  # fmt: skip
            self._record_usage(client, "", call.start, call.end, tokens, True, began, peer=str(context.remote_id))
        except (RequestError, TimeoutError) as e:
            yield error_response(e if isinstance(e, RequestError) else RequestError("the request timed out"))
            return
        for message in chunked_messages(None, [out]):
            yield message

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=self.record_json)

    def cache_tokens_left(self) -> int:
        per_token = self.span.kv_bytes_per_token(self.span.start, self.span.end)
        return max(0, self.budget.free_bytes // max(per_token, 1))
