"""DistributedModel: remote layers as a torch module (like Petals' RemoteSequential).

``layers[i]`` and ``layers[a:b]`` select layers; calling the module runs them on Far Nodes. It is
differentiable: the backward pass asks each node for the gradient w.r.t. its input, so gradients
reach local parameters (embeddings, prompts, heads); node weights never change.
"""

import asyncio
import logging
from contextlib import closing

import torch
from torch import nn

from farmesh_core.client.direct_lane import DirectConnection
from farmesh_core.client.mesh import NETWORK_ERRORS, MeshConnection, connect
from farmesh_core.config import ClientConfig
from farmesh_core.errors import RemoteError
from farmesh_core.extensions import RouteHop
from farmesh_core.wire import ChunkedReceiver, SpanCall, chunked_messages, deserialize_tensor

logger = logging.getLogger(__name__)


class _RemoteLayersFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, layers: "DistributedModel") -> torch.Tensor:
        output, hop_inputs = layers._run_forward(hidden.detach())
        ctx.layers, ctx.hop_inputs = layers, hop_inputs
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return ctx.layers._run_backward(ctx.hop_inputs, grad_output.contiguous()), None


class DistributedModel(nn.Module):
    """Layers ``start:end`` of a model served by the Far Mesh Network, as an ``nn.Module``."""

    def __init__(self, model_id: str, dht_bootstrap: str | list[str] | None = None, **options):
        super().__init__()
        checkpoint, adapter, mesh = connect(
            ClientConfig(model_id=model_id, dht_bootstrap=dht_bootstrap or [], **options)
        )
        self._init(mesh, 0, adapter.num_layers(checkpoint.config), owns_mesh=True)

    def _init(self, mesh: MeshConnection, start: int, end: int, owns_mesh: bool = False) -> None:
        self.mesh, self.start, self.end, self._owns_mesh = mesh, start, end, owns_mesh

    @classmethod
    def over(cls, mesh: MeshConnection, start: int, end: int) -> "DistributedModel":
        """Layers ``start:end`` through an existing connection (shared with a client)."""
        layers = cls.__new__(cls)
        nn.Module.__init__(layers)
        layers._init(mesh, start, end)
        return layers

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, item: int | slice) -> "DistributedModel":
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1 or start >= stop:
                raise IndexError("DistributedModel slices must be non-empty and contiguous")
            return DistributedModel.over(self.mesh, self.start + start, self.start + stop)
        if not -len(self) <= item < len(self):
            raise IndexError(f"layer {item} is out of range for {len(self)} layers")
        index = self.start + (item % len(self))
        return DistributedModel.over(self.mesh, index, index + 1)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def extra_repr(self) -> str:
        return f"layers {self.start}:{self.end} of {self.mesh.prefix}"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``hidden`` [batch, seq, hidden] through the layers remotely (differentiable)."""
        return _RemoteLayersFunction.apply(hidden, self)

    def close(self) -> None:
        if self._owns_mesh:
            self.mesh.close()

    # ---- remote calls with failover ----------------------------------------------------------
    def _run_forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[tuple[RouteHop, torch.Tensor]]]:
        return self._forward_chain(hidden, self.start, self.end, set())

    def _run_backward(self, hop_inputs, grad: torch.Tensor) -> torch.Tensor:
        return self._backward_chain(hop_inputs, grad, set())

    def _call(self, method: str, hop: RouteHop, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``method`` on ``hop``'s node: over its direct lane from this thread, with blocking sockets
        (as inference sessions step), else over P2P on the mesh's event loop."""
        call = SpanCall(start=hop.start, end=hop.end, adapter=self.mesh.config.adapter,
                        credentials=self.mesh.credentials)  # fmt: skip
        limit = 2 * sum(t.numel() * t.element_size() for t in tensors) + 4096
        receiver = ChunkedReceiver(None, limit, 1)
        timeout = self.mesh.timeout_for(tensors[0].shape[0] * tensors[0].shape[1])
        lane = self.mesh.direct_lane(hop.peer_id)
        connection = None
        if lane is not None:
            try:
                connection = DirectConnection(*lane, self.mesh.direct_hello(hop.peer_id, method))
            except OSError as e:
                logger.info("Direct lane of %s unreachable (%r); using P2P", hop.peer_id, e)
                self.mesh.lane_unreachable(hop.peer_id)
        if connection is not None:
            with closing(connection):
                for message in chunked_messages(call, tensors):
                    connection.send(message, timeout)
                connection.end_requests()
                for response in connection.responses(timeout):
                    receiver.add(response)
        else:
            self.mesh.loop.run(asyncio.wait_for(self._p2p_call(method, hop, call, tensors, receiver), timeout))
        _, (proto,) = receiver.result()
        return deserialize_tensor(proto, copy=True)

    async def _p2p_call(self, method: str, hop: RouteHop, call: SpanCall, tensors, receiver: ChunkedReceiver) -> None:
        stub = await self.mesh.stub(hop.peer_id, direct=False)

        async def requests():
            for message in chunked_messages(call, tensors):
                yield message

        async for response in await getattr(stub, method)(requests()):
            receiver.add(response)

    def _forward_chain(self, hidden, start, end, avoid, depth: int = 0):
        hop_inputs = []
        for hop in self.mesh.route(start, end, avoid, self.mesh.config.adapter):
            try:
                output = self._call("rpc_forward", hop, [hidden])
                hop_inputs.append((hop, hidden))
            except NETWORK_ERRORS as e:
                self._give_up_if_exhausted(hop, e, avoid, depth)
                output, sub_inputs = self._forward_chain(hidden, hop.start, hop.end, avoid, depth + 1)
                hop_inputs.extend(sub_inputs)
            hidden = output
        return hidden, hop_inputs

    def _backward_chain(self, hop_inputs, grad, avoid, depth: int = 0):
        for hop, hidden in reversed(hop_inputs):
            try:
                grad = self._call("rpc_backward", hop, [hidden, grad])
            except NETWORK_ERRORS as e:
                self._give_up_if_exhausted(hop, e, avoid, depth)
                _, sub_inputs = self._forward_chain(hidden, hop.start, hop.end, avoid, depth + 1)
                grad = self._backward_chain(sub_inputs, grad, avoid, depth + 1)
        return grad

    def _give_up_if_exhausted(self, hop: RouteHop, error: Exception, avoid: set[str], depth: int) -> None:
        avoid.add(hop.peer_id)
        self.mesh.report_failure(hop.peer_id)
        logger.warning("Node %s failed on layers %d:%d (%r); rerouting", hop.peer_id, hop.start, hop.end, error)
        if depth >= self.mesh.config.max_retries:
            raise RemoteError(f"layers {hop.start}:{hop.end} failed {depth + 1} times: {error!r}") from error
