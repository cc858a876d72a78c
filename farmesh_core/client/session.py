"""An inference session: hidden states step through a chain of Far Nodes that keep the KV caches.

The client holds one open stream per node, driven from the calling thread: over the nodes' direct
lanes with blocking sockets, or over P2P through the mesh's loop. With direct lanes, each node pushes
its output straight to the next node (``farmesh_core.node.push``) and the client only reads the
answers; where a push cannot be made, the client relays that step itself. It keeps every node's
inputs, so when a node fails it routes around it, replays those inputs to the replacement (which
rebuilds the same KV cache) and carries on: the output is the same as without the failure.
"""

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field

import torch
from hivemind.proto import runtime_pb2

from farmesh_core.client.direct_lane import DirectConnection
from farmesh_core.client.mesh import NETWORK_ERRORS, MeshConnection
from farmesh_core.config import adapter_name
from farmesh_core.errors import NoRouteError, RemoteError, RequestError
from farmesh_core.extensions import RouteHop
from farmesh_core.wire import (
    InferenceStep,
    OpenSession,
    PushTarget,
    StepReply,
    TokenLoop,
    WireTensor,
    deserialize_tensor,
    encode_meta,
    step_reply,
    tensor_message,
    wire_tensor,
)

logger = logging.getLogger(__name__)

REPLAY_CHUNK = 1024  # tokens per replay step
MAX_STEP_BYTES = 16 * 1024**2  # longer steps are split: nodes refuse messages over 32 MiB by default


class _HopStream:
    """One open rpc_inference stream to one node for layers ``hop.start:hop.end``: over the node's
    direct lane (blocking calls in the caller's thread) where the client holds a ticket, else P2P.

    In a push session (``push_key``) messages are numbered, the previous node may push this node's
    input, and each answer names the message it answers: older answers (to a step retried after a
    failure) are skipped.
    """

    def __init__(self, hop: RouteHop, push: bool = False):
        self.hop = hop
        self.session_id = uuid.uuid4().hex
        self.push_key = secrets.token_hex(16) if push else None
        self.numbered = 0  # the number of the last message sent (or pushed) to this node
        self.opened = False  # a message opening the session was sent
        self.ahead = False  # to open ahead of its first input, once the first node has its step
        self.inputs: list[WireTensor | int] = []  # every input sent (a token loop's token: pushed), for replays
        self._direct: DirectConnection | None = None
        self._queue: asyncio.Queue | None = None  # P2P: requests to send
        self._responses = None

    @property
    def is_open(self) -> bool:
        return self._direct is not None or self._responses is not None

    @property
    def is_direct(self) -> bool:
        return self._direct is not None

    def number(self) -> int:
        """A number for the next message to this node (0 outside push sessions)."""
        if self.push_key is None:
            return 0
        self.numbered += 1
        return self.numbered

    def open_direct(self, mesh: MeshConnection) -> None:
        """Connect to the node's direct lane if it has one; on failure the stream stays on P2P."""
        if self.is_open:
            return
        try:
            self._direct = mesh.inference_lane(self.hop.peer_id)
        except OSError as e:
            logger.info("Direct lane of %s unreachable (%r); using P2P", self.hop.peer_id, e)
            mesh.lane_unreachable(self.hop.peer_id)

    async def open_p2p(self, mesh: MeshConnection) -> None:
        if not self.is_open:
            stub = await mesh.stub(self.hop.peer_id, direct=False)
            self._queue = asyncio.Queue()
            self._responses = await stub.rpc_inference(self._requests())

    async def _requests(self):
        while (item := await self._queue.get()) is not None:
            yield item

    @staticmethod
    def timeout(mesh: MeshConnection, hidden: "WireTensor | int", meta: InferenceStep | None = None) -> float:
        """How long a step carrying ``hidden`` (or a token loop's token) may take (opening one may wait
        for the node's memory)."""
        waiting_for_memory = meta.open.alloc_timeout if meta is not None and meta.open is not None else 0.0
        tokens = 1 if isinstance(hidden, int) else hidden.size[0] * hidden.size[1]
        return mesh.timeout_for(tokens) + waiting_for_memory

    def step(self, mesh: MeshConnection, meta: InferenceStep, hidden: WireTensor) -> WireTensor:
        """Send one step and wait for its output, giving up after the mesh's timeout for its size."""
        self.send(mesh, meta, hidden)
        return self.receive(mesh, self.timeout(mesh, hidden, meta))[0]

    def send(self, mesh: MeshConnection, meta: InferenceStep, hidden: WireTensor) -> None:
        request = tensor_message(runtime_pb2.ExpertRequest, hidden, encode_meta(meta))
        self._send(mesh, request, self.timeout(mesh, hidden, meta))

    def open_ahead(self, mesh: MeshConnection, opening: OpenSession) -> None:
        """Open the session before its first input, which the previous node will push: that node's
        output of the first step (the prompt) then goes straight on, as in the steps after it."""
        meta = InferenceStep(position=0, open=opening)
        self._send(mesh, runtime_pb2.ExpertRequest(metadata=encode_meta(meta)), mesh.config.step_timeout)
        self.opened = True

    def _send(self, mesh: MeshConnection, request: runtime_pb2.ExpertRequest, timeout: float) -> None:
        self.open_direct(mesh)
        if self._direct is not None:
            self._direct.send(request, timeout)
        else:
            mesh.loop.run(self._p2p_send(mesh, request))

    def receive(self, mesh: MeshConnection, timeout: float) -> tuple[WireTensor, StepReply | None]:
        """The output of the last message numbered for this node, and the node's reply (push sessions):
        whether it pushed the output on, and the token it chose (a token loop's last node)."""
        while True:
            if self._direct is not None:
                response = self._direct.receive(timeout)
            else:
                response = mesh.loop.run(self._p2p_receive(mesh, timeout))
            reply = step_reply(response, self.hop.peer_id)
            if reply is None or reply.step == self.numbered:
                break
            logger.debug("Skipped %s's answer to message %d (waiting for %d)", self.hop.peer_id, reply.step,
                         self.numbered)  # fmt: skip
        if len(response.tensors) != 1:
            raise RemoteError(f"node {self.hop.peer_id} answered with {len(response.tensors)} tensors")
        return response.tensors[0], reply

    def answered_within(self, timeout: float) -> bool:
        """Whether an answer of the node's is here or arrives within ``timeout`` seconds (direct lanes only)."""
        return self._direct is not None and self._direct.answered_within(timeout)

    async def _p2p_send(self, mesh: MeshConnection, request: runtime_pb2.ExpertRequest) -> None:
        async with asyncio.timeout(mesh.config.step_timeout):
            await self.open_p2p(mesh)
        self._queue.put_nowait(request)

    async def _p2p_receive(self, mesh: MeshConnection, timeout: float) -> runtime_pb2.ExpertResponse:
        async with asyncio.timeout(timeout):
            return await anext(self._responses)

    def close(self, mesh: MeshConnection) -> None:
        if mesh.forked():  # the connection is the parent's too: let go of this process's copy only
            if self._direct is not None:
                self._direct.sock.close()
            return
        if self._direct is not None:
            self._direct.close()
        if self._queue is not None:
            mesh.loop.loop.call_soon_threadsafe(self._queue.put_nowait, None)


@dataclass
class LoopAsk:
    """What a client asks of a token loop (``wire.TokenLoop`` without the ring): ``tokens`` still to
    choose, of ``asked`` at first."""

    tokens: int
    eos_token_ids: list[int] = field(default_factory=list)
    masked_ids: list[int] = field(default_factory=list)
    masked_until: int = 0
    asked: int = field(init=False)

    def __post_init__(self):
        self.asked = self.tokens

    def turn(self, ring: list[PushTarget]) -> TokenLoop:
        return TokenLoop(ring=ring, tokens=self.tokens, eos_token_ids=self.eos_token_ids,
                         masked_ids=self.masked_ids, masked_until=self.masked_until)  # fmt: skip


class InferenceSession:
    """A generation's KV caches on the chain of nodes covering ``start:end``; use as a context manager."""

    def __init__(
        self, mesh: MeshConnection, start: int, end: int, max_length: int, batch_size: int = 1,
        adapter: str | None = None,
    ):  # fmt: skip
        self.mesh, self.start, self.end = mesh, start, end
        # An adapter may be named by its directory too, as the node was given it: nodes know basenames.
        adapter = adapter_name(adapter) if adapter else None
        self.max_length, self.batch_size, self.adapter = max_length, batch_size, adapter
        self.position = 0
        self.recoveries: list[float] = []  # seconds each failover took
        self.pushed_inputs = 0  # inputs a node got pushed by the previous one rather than from the client
        self.looped_tokens = 0  # tokens the last node chose in a token loop (see loop_tokens)
        hops = mesh.route(start, end, adapter=adapter)
        self.push = mesh.use_direct_lanes and self._pushes(hops)  # nodes push outputs on (see _HopStream)
        self._streams = [self._stream(hop) for hop in hops]
        self._failed: set[str] = set()
        self._step_seconds = 0.0  # how long the last step took through the whole chain
        self._rest_pending = False  # streams after the first wait to be connected (see _connect_rest)
        self._spares_opened = False  # see _open_spares
        self._owed: torch.Tensor | None = None  # inputs counted in ``position`` but not sent yet (see ``owe``)
        self.before_first_step: Callable[[], None] | None = None  # called once, as the first step begins
        self._embed: Callable[[int], torch.Tensor] | None = None  # a token loop's: see _input

    def _pushes(self, hops: list[RouteHop]) -> bool:
        """The client's ``push``; by default True (a token loop needs it), unless no loop can run (token
        loops off, or several sequences) and several nodes all run on this machine. There, before a
        step's threads were kept apart (``openmp.spread_team``), the client relaying each step was
        quicker (baseline model, 2 nodes: 3.68 against 4.26 ms a token, 30 of 40 alternating
        generations; a 32k-vocabulary model: 4.54 against 4.89, 19 of 24; since, 3.26 against 3.31 and
        2.89 against 2.86, 20 each) and 8 concurrent sessions ran as fast; across machines a push saves
        a network trip."""
        push = self.mesh.config.push
        if push is None:
            push = self.mesh.config.token_loop and self.batch_size == 1 or not self._several_on_this_machine(hops)
        return push

    def _several_on_this_machine(self, hops: list[RouteHop]) -> bool:
        """Whether the chain has several nodes and all run on this machine (so they share its cores)."""
        return len(hops) > 1 and all(self.mesh.on_this_machine(hop.peer_id) for hop in hops)

    def _stream(self, hop: RouteHop) -> _HopStream:
        """A stream to ``hop``: a push session where the node has a direct lane (pushes arrive there)."""
        return _HopStream(hop, push=self.push and self.mesh.offers_direct_lane(hop.peer_id))

    @property
    def route(self) -> list[RouteHop]:
        return [s.hop for s in self._streams]

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for stream in self._streams:
            stream.close(self.mesh)

    def owe(self, hidden: torch.Tensor) -> None:
        """Count ``hidden`` [batch, seq, hidden] (the next tokens' inputs) as this session's, and send
        it only if the session goes on, ahead of the next step's input: a generation that ran as a row
        of a shared session (``batched_generation``) leaves its own session's nodes without its tokens."""
        if self.position + hidden.shape[1] > self.max_length:
            raise RequestError(f"the session was opened for {self.max_length} tokens")
        self._owed = hidden if self._owed is None else torch.cat([self._owed, hidden], dim=1)
        self.position += hidden.shape[1]

    def _begin(self, hidden: torch.Tensor) -> None:
        self.mesh.check_process()
        if self.before_first_step is not None:
            call, self.before_first_step = self.before_first_step, None
            call()
        if self.position + hidden.shape[1] > self.max_length:
            raise RequestError(f"the session was opened for {self.max_length} tokens")

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Send ``hidden`` [batch, seq, hidden] (the next tokens) through every layer; return the output."""
        self._begin(hidden)
        if self._owed is not None:  # one step with the owed inputs first, their outputs dropped
            owed, self._owed = self._owed, None
            self.position -= owed.shape[1]
            return self.step(torch.cat([owed, hidden], dim=1))[:, owed.shape[1] :]
        per_token = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
        max_tokens = max(1, MAX_STEP_BYTES // per_token)
        if hidden.shape[1] > max_tokens:
            return torch.cat([self.step(part) for part in hidden.split(max_tokens, dim=1)], dim=1)
        out = self._step(wire_tensor(hidden))[0]
        self.position += hidden.shape[1]
        return deserialize_tensor(out, copy=True)  # the proto owns the buffer, read-only

    def rewind(self, position: int) -> None:
        """Forget the tokens from ``position`` on (drafts that a speculative step checked and rejected):
        the next step writes over them on every node, and a node that fails later is replaced with the
        inputs up to ``position`` only."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind a session at position {self.position} to {position}")
        if self._owed is not None:
            raise RequestError("a session with owed inputs steps them first (see owe)")
        for stream in self._streams:
            stream.inputs = _first_tokens(stream.inputs, position)
        self.position = position

    def loops(self, head_dtype: torch.dtype) -> bool:
        """Whether :meth:`loop_tokens` should run here: it can (one sequence from the first layer, every
        node pushing, and the last one choosing tokens with a head of ``head_dtype``, the client's), and
        the client's ``token_loop`` wants it (by default it does). Through one node the loop was quicker
        (2.79 against 3.01 ms a token); through two on one machine, which share its cores with the
        client, it was not until a step's threads were kept apart (``openmp.spread_team``): 4.05 against
        3.86 ms before, 3.10 against 3.26 and 2.70 against 2.89 after (14 and 19 of 20 alternating
        generations, baseline model)."""
        if not self._streams:
            return False
        last = self._streams[-1].hop
        return (
            self.mesh.config.token_loop
            and self.batch_size == 1
            and self.start == 0
            and self._owed is None
            and all(s.push_key for s in self._streams)
            and self.mesh.chooses_tokens(last.peer_id, last.end, head_dtype)
        )

    def loop_tokens(
        self, hidden: torch.Tensor, ask: "LoopAsk", embed: Callable[[int], torch.Tensor],
        choose: Callable[[torch.Tensor], int],
    ) -> Iterator[int]:  # fmt: skip
        """The next ``ask.tokens`` greedy tokens after ``hidden`` [1, seq, hidden] (inputs not sent yet),
        chosen by the node with the last layers, which sends each one's embedding round the chain
        itself (a token loop: see ``wire.TokenLoop``); ends after an id of ``ask.eos_token_ids``.

        The client reads every node's answer as it comes, and keeps each node's inputs as in
        :meth:`step` (``embed(token)`` is the first node's, as the loop pushed it), so a failed node is
        replaced as there; the step then goes on from the client, which asks the loop to go on. Where
        the last node did not choose (a replacement without a head), ``choose(output)`` does.
        """
        self._begin(hidden)
        if self._owed is not None:
            raise RequestError("a session with owed inputs steps them first (see owe)")
        self._embed = embed
        wire, pushed, length = wire_tensor(hidden), False, hidden.shape[1]
        try:
            while ask.tokens > 0:
                if pushed:  # the last node sent this turn's input round: every node answers the next number
                    for stream in self._streams:
                        stream.number()
                out, reply = self._step(wire, ask, pushed)
                self.position += length
                token = None if reply is None else reply.token
                if token is None:
                    token = choose(deserialize_tensor(out, copy=True))
                else:
                    self.looped_tokens += 1
                ask.tokens -= 1
                pushed = reply is not None and reply.pushed
                yield token
                if ask.tokens == 0 or token in ask.eos_token_ids:
                    return
                if self.position >= self.max_length:  # (as :meth:`step` would for the next token)
                    raise RequestError(f"the session was opened for {self.max_length} tokens")
                wire, length = token, 1  # embedded only where the client sends it or replays it (_input)
        finally:
            if pushed and ask.tokens > 0:  # read no further: the loop may still run on the nodes
                self._skip_loop_numbers(ask)

    def _opening(self, stream: _HopStream) -> OpenSession:
        """What opens ``stream``'s session on its node."""
        return OpenSession(
            session_id=stream.session_id, start=stream.hop.start, end=stream.hop.end,
            max_length=self.max_length, batch_size=self.batch_size, alloc_timeout=self.mesh.config.step_timeout,
            adapter=self.adapter, credentials=self.mesh.credentials, push_key=stream.push_key,
        )  # fmt: skip

    def _meta(
        self,
        stream: _HopStream,
        position: int,
        following: list[_HopStream] | None = None,
        loop: "LoopAsk | None" = None,
    ) -> InferenceStep:
        """The metadata of a step to ``stream``: it opens the session the first time, and asks the node
        to push its output along ``following`` (the next streams), as far as they are open push
        sessions; with ``loop``, the last of them to go on with a token loop."""
        opening = None
        if not stream.opened:
            opening, stream.opened = self._opening(stream), True
        push = []
        for nxt in following or () if stream.push_key else ():
            if not (nxt.push_key and (nxt.opened or nxt.ahead)):
                break
            push.append(PushTarget(peer_id=nxt.hop.peer_id, session_id=nxt.session_id, key=nxt.push_key,
                                   step=nxt.number()))  # fmt: skip
        number = stream.number()
        token_loop = None
        if loop is not None and len(push) == len(following or ()):  # the loop goes with the pushes to the end
            ring = [
                PushTarget(peer_id=s.hop.peer_id, session_id=s.session_id, key=s.push_key, step=s.numbered + 1)
                for s in self._streams
            ]
            token_loop = loop.turn(ring)
        return InferenceStep(position=position, step=number, open=opening, push=push, loop=token_loop)

    def _connect(self, streams: list[_HopStream]) -> None:
        """Connect ``streams`` at once rather than one after another: over direct lanes, else P2P."""
        for stream in streams:
            stream.open_direct(self.mesh)
        p2p = [s for s in streams if not s.is_open]
        if p2p:
            self.mesh.loop.run(self._open_p2p(p2p))

    def _connect_first(self) -> None:
        """Connect the first node's stream, and mark the sessions that the previous node can push to
        for opening ahead of their first input; the other streams connect once the first node has its
        step (``_connect_rest``)."""
        self._connect(self._streams[:1])
        for previous, stream in zip(self._streams, self._streams[1:], strict=False):
            stream.ahead = bool(previous.push_key and stream.push_key and not stream.opened)
        self._rest_pending = True

    def _connect_rest(self) -> None:
        """Connect the other streams, and open ahead the sessions marked so (failures surface at their
        steps). Done once the first node has its step, so that the other nodes' work of accepting a
        connection and opening a session takes no core from it as it starts (traced on one machine:
        the first node accepted its connection 0.5 ms after the second). A push that overtakes an
        opening waits for it on its node."""
        if not self._rest_pending:
            return
        self._rest_pending = False
        self._connect([s for s in self._streams if not s.is_open])
        for stream in self._streams:
            if stream.ahead:
                stream.ahead = False
                with suppress(*NETWORK_ERRORS):  # the stream's step fails over then
                    stream.open_ahead(self.mesh, self._opening(stream))

    def _open_spares(self) -> None:
        """Once, as the second step goes through the nodes: a spare connection to each node's lane
        (``MeshConnection.open_spares``), so that the next session through them starts sooner. Not
        before: the first token waits for no more than it must, and a one-step session opens none."""
        if self._spares_opened or self.position == 0:
            return
        self._spares_opened = True
        self.mesh.open_spares([s.hop.peer_id for s in self._streams if s.is_direct])

    async def _open_p2p(self, streams: list[_HopStream]) -> None:
        with suppress(TimeoutError):  # a stream that did not open is retried (and failed over) at its step
            async with asyncio.timeout(self.mesh.config.step_timeout):
                await asyncio.gather(*(s.open_p2p(self.mesh) for s in streams), return_exceptions=True)

    def _input(self, hidden: "WireTensor | int") -> torch.Tensor:
        """A recorded input as a tensor: a token id stands for its embedding, which a token loop's
        last node sent the first node (the client embeds it only if it must send or replay it)."""
        return self._embed(hidden) if isinstance(hidden, int) else deserialize_tensor(hidden)

    def _step(
        self, hidden: "WireTensor | int", loop: "LoopAsk | None" = None, pushed: bool = False
    ) -> tuple[WireTensor, StepReply | None]:
        """``hidden`` through every node: the output, and the last node's reply. ``pushed``: the last
        node of a token loop already sent ``hidden`` (the embedding of a token id) to the first."""
        if self.position == 0:
            self._connect_first()
        began, index, failures = time.perf_counter(), 0, 0
        reply = None
        while index < len(self._streams):
            stream = self._streams[index]
            try:
                if not pushed:
                    if isinstance(hidden, int):  # a token loop's turn the client sends after all
                        hidden = wire_tensor(self._input(hidden))
                    meta = self._meta(stream, self.position, self._streams[index + 1 :], loop)
                    stream.send(self.mesh, meta, hidden)
                    self._connect_rest()
                self._open_spares()  # (once: a turn of a token loop, whose input the client never sends, too)
                if pushed and index == 0 or not pushed and len(meta.push) == len(self._streams) - index - 1 > 0:
                    # Pushed on to the last node: wait for its answer (at most twice the last step's
                    # time) before reading the answers in order. Waking for each earlier answer as
                    # it came took a core from the node computing next, on a shared machine.
                    self._streams[-1].answered_within(2 * self._step_seconds)
                out, reply = stream.receive(self.mesh, stream.timeout(self.mesh, hidden))
            except NETWORK_ERRORS as e:
                failures += 1
                self._give_up_if_exhausted(failures, stream.hop, e)
                if loop is not None:  # the loop may still go round the nodes that remain
                    self._skip_loop_numbers(loop)
                self._replace(index, e)
                pushed = False  # the replacement gets this step from the client
                continue
            stream.inputs.append(hidden)
            self.pushed_inputs += pushed
            hidden = out
            index += 1
            pushed = reply is not None and reply.pushed
        self._step_seconds = time.perf_counter() - began
        return hidden, reply

    def _skip_loop_numbers(self, loop: "LoopAsk") -> None:
        """Number the next messages to every node past those that a token loop asked for up to ``loop.asked``
        tokens may still use, so that its messages still going round are stale to every node."""
        for stream in self._streams:
            stream.numbered += loop.asked + 1

    def _give_up_if_exhausted(self, failures: int, hop: RouteHop, error: Exception) -> None:
        if failures > self.mesh.config.max_retries:
            raise RemoteError(
                f"layers {hop.start}:{hop.end} failed {failures} times in one step; last error: {error!r}"
            ) from error

    def _mark_failed(self, stream: _HopStream, error: Exception) -> None:
        stream.close(self.mesh)
        self._failed.add(stream.hop.peer_id)
        self.mesh.report_failure(stream.hop.peer_id)
        logger.warning(
            "Node %s failed on layers %d:%d (%r)", stream.hop.peer_id, stream.hop.start, stream.hop.end, error
        )

    def _replace(self, index: int, error: Exception) -> None:
        """Swap the failed stream for a new sub-chain and rebuild its caches from the recorded inputs."""
        began = time.perf_counter()
        failed = self._streams[index]
        self._mark_failed(failed, error)
        history = torch.cat([self._input(t) for t in failed.inputs], dim=1) if failed.inputs else None
        for attempt in range(1, self.mesh.config.max_retries + 2):
            try:
                hops = self.mesh.route(failed.hop.start, failed.hop.end, self._failed, self.adapter)
            except NoRouteError as e:
                raise NoRouteError(f"node {failed.hop.peer_id} failed and no other node can take over: {e}") from e
            new_streams = [self._stream(hop) for hop in hops]
            current = new_streams[0]
            try:
                for start in range(0, 0 if history is None else history.shape[1], REPLAY_CHUNK):
                    hidden = wire_tensor(history[:, start : start + REPLAY_CHUNK])
                    for current in new_streams:
                        out = current.step(self.mesh, self._meta(current, start), hidden)
                        current.inputs.append(hidden)
                        hidden = out
            except NETWORK_ERRORS as e:
                self._mark_failed(current, e)
                for stream in new_streams:
                    stream.close(self.mesh)
                self._give_up_if_exhausted(attempt, failed.hop, e)
                continue
            self._streams[index : index + 1] = new_streams
            self.recoveries.append(time.perf_counter() - began)
            logger.info("Replaced node %s by %s in %.3f s", failed.hop.peer_id, [h.peer_id for h in hops],
                        self.recoveries[-1])  # fmt: skip
            return


def _first_tokens(inputs: list[WireTensor | int], tokens: int) -> list[WireTensor | int]:
    """A stream's recorded ``inputs`` (see ``_HopStream.inputs``) up to ``tokens`` tokens, the last one
    cut short where it runs past them."""
    kept: list[WireTensor | int] = []
    for item in inputs:
        if tokens <= 0:
            break
        length = 1 if isinstance(item, int) else item.size[1]
        if length > tokens:
            item, length = wire_tensor(deserialize_tensor(item)[:, :tokens].contiguous()), tokens
        kept.append(item)
        tokens -= length
    return kept
