"""Declare and look up which Far Node serves which layers.

Every node of one model stores its :class:`NodeRecord` under one DHT key (``farmesh:<prefix>``),
with its peer id as the subkey, so a single ``get`` returns the whole Far Mesh Network of a model.
Records are refreshed periodically and expire on their own if a node dies.
"""

import asyncio
import logging
import multiprocessing.process
import os

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr
from pydantic import ValidationError

from farmesh_core.config import NetworkConfig, NodeRecord, maddr_host
from farmesh_core.wire import DirectTicket, FarNodeRPC

logger = logging.getLogger(__name__)

# Off by default: UPnP, AutoNAT and relays contact hosts beyond the peers you name.
P2P_DEFAULTS = dict(nat_port_map=False, auto_nat=False, use_relay=False, use_auto_relay=False, use_ipfs=False)


def _forget_parents_processes() -> None:
    """In a child forked by ``os.fork`` (not by multiprocessing, which does this itself): drop the
    parent's processes, such as its DHT peer, from multiprocessing's list of this process's children.

    The child inherits that list. At its exit, multiprocessing's exit handler would send SIGTERM to
    every daemon process on it, the parent's DHT peer included, and fail to join them ("can only join
    a child process"). The parent's client would lose its DHT and could no longer find new routes."""
    children = getattr(multiprocessing.process, "_children", None)
    if isinstance(children, set):
        children.difference_update([p for p in children if getattr(p, "_parent_pid", None) != os.getpid()])


os.register_at_fork(after_in_child=_forget_parents_processes)


def start_dht(config: NetworkConfig, client_mode: bool = False) -> DHT:
    """Start a DHT peer (in its own process) joined to ``config.dht_bootstrap``."""
    return DHT(
        initial_peers=config.dht_bootstrap or None,
        host_maddrs=config.listen_maddrs(),
        announce_maddrs=config.announce_maddrs,
        client_mode=client_mode,
        start=True,
        **P2P_DEFAULTS,
    )


def mesh_key(prefix: str) -> str:
    return f"farmesh:{prefix}"


def declare_node(dht: DHT, prefix: str, record: NodeRecord, ttl: float) -> None:
    """Store (or refresh) this node's record; it expires after ``ttl`` seconds unless refreshed."""
    dht.store(
        mesh_key(prefix),
        subkey=record.peer_id,
        value=record.model_dump(mode="json"),
        expiration_time=get_dht_time() + ttl,
        return_future=False,
    )


def fetch_node_records(dht: DHT, prefix: str, online_only: bool = True) -> list[NodeRecord]:
    """All valid records of the model's nodes; malformed ones are logged and skipped."""
    found = dht.get(mesh_key(prefix), latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    records = []
    for subkey, item in found.value.items():
        try:
            record = NodeRecord.model_validate(item.value)
        except ValidationError as e:
            logger.warning("Ignoring a malformed node record under %r: %s", subkey, e.errors()[:1])
            continue
        if record.peer_id != subkey:
            logger.warning("Ignoring a node record whose peer id does not match its subkey %r", subkey)
            continue
        if online_only and record.state != "online":
            continue
        records.append(record)
    return sorted(records, key=lambda r: (r.start, r.end, r.peer_id))


async def dial(p2p: P2P, record: NodeRecord, timeout: float = 10.0) -> None:
    """Connect ``p2p`` to the node of ``record`` at the addresses it announced."""
    addrs = [Multiaddr(a.split("/p2p/")[0]) for a in record.addrs]
    await asyncio.wait_for(p2p._client.connect(PeerID.from_base58(record.peer_id), addrs), timeout)


async def direct_ticket(p2p: P2P, record: NodeRecord, timeout: float) -> tuple[str, DirectTicket] | None:
    """The host of ``record``'s direct lane and this peer's ticket to it, asked over P2P (which
    authenticates this peer); None if the node announces no lane."""
    host = maddr_host(record.addrs)  # the lane listens beside the node's P2P address
    if not record.direct_lane or host is None:
        return None
    stub = FarNodeRPC.get_stub(p2p, PeerID.from_base58(record.peer_id))
    response = await stub.rpc_direct_ticket(runtime_pb2.ExpertUID(), timeout=timeout)
    return host, DirectTicket.model_validate_json(response.serialized_info)
