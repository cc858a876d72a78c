"""Typed configuration and the records nodes publish in the DHT (pydantic v2)."""

import os
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from farmesh_core import __version__

NodeState = Literal["joining", "online", "offline"]


def parse_layers(text: str) -> tuple[int, int]:
    """Parse ``"START:END"`` (END exclusive) into a pair; raise ValueError on anything else."""
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise ValueError(f"layers must look like START:END (for example 0:4), got {text!r}") from None
    if not 0 <= start < end:
        raise ValueError(f"layers {text!r}: need 0 <= START < END")
    return start, end


def adapter_name(path: str) -> str:
    """The name a node serves a LoRA adapter directory under (``NodeConfig.adapters``), in its DHT
    record and on the wire: the directory's basename (``/ckpt/math-lora/`` is ``"math-lora"``)."""
    return os.path.basename(os.path.normpath(path))


def _is_loopback(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/"))


def maddr_host(maddrs: list[str]) -> str | None:
    """The IP address of the first IPv4 or IPv6 multiaddr in ``maddrs`` (``/ip4/10.0.0.2/tcp/...``)."""
    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
            return parts[2]
    return None


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


class NetworkConfig(BaseModel):
    """Where to find the Far Mesh Network and how to listen."""

    model_config = ConfigDict(extra="forbid")
    dht_bootstrap: list[str] = Field(default_factory=list, description="multiaddrs of DHT peers")
    host_maddrs: list[str] | None = Field(
        default=None,
        description="multiaddrs to listen on; default: loopback when every bootstrap peer is on loopback, "
        "else all interfaces",
    )
    announce_maddrs: list[str] | None = None
    dht_prefix: str | None = Field(default=None, description="DHT namespace; default: derived from the checkpoint")
    keep_freed_memory: bool = Field(
        default=True,
        description="a Far Node or client fixes glibc malloc's thresholds for its process, so that freed blocks "
        "up to 32 MiB are kept for reuse rather than mapped afresh each time (see farmesh_core/malloc.py)",
    )

    @field_validator("dht_bootstrap", mode="before")
    @classmethod
    def _bootstrap_list(cls, value):
        return _as_list(value)

    def listen_maddrs(self) -> list[str]:
        if self.host_maddrs is not None:
            return self.host_maddrs
        on_loopback = all("/ip4/127." in addr for addr in self.dht_bootstrap)
        return ["/ip4/127.0.0.1/tcp/0"] if on_loopback else ["/ip4/0.0.0.0/tcp/0"]

    def listen_host(self) -> str:
        """The IP address of the first listen multiaddr (where the direct lane listens too)."""
        return maddr_host(self.listen_maddrs()) or "127.0.0.1"

    def reachable_maddrs(self, addrs: list[str]) -> list[str]:
        """The addresses worth announcing: when this peer listens beyond loopback, loopback addresses
        are left out (another host dialing 127.0.0.1 reaches itself), unless nothing else is left.
        Given ``announce_maddrs`` are kept as they are."""
        if self.announce_maddrs or all(_is_loopback(addr) for addr in self.listen_maddrs()):
            return addrs
        return [addr for addr in addrs if not _is_loopback(addr)] or addrs


class NodeConfig(NetworkConfig):
    """Everything a Far Node needs; the CLI and ``FarNode(...)`` keyword arguments fill it."""

    model_id: str
    layers: str | None = Field(default=None, description='"START:END", END exclusive')
    num_layers: int | None = Field(default=None, gt=0)
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quantization: str = Field(default="none", max_length=64)
    lean_layers: bool = Field(
        default=True,
        description="run inference steps of unmodified Llama layers as plain torch calls (bit-identical, "
        "faster on CPU); False: always through the transformers modules",
    )
    pack_batch_weights: bool | None = Field(
        default=None,
        description="keep a copy of the layers' weights packed for oneDNN, which runs decode batches of several "
        "sessions about twice as fast on CPU when the weights exceed the caches, at the weights' memory again; "
        "None: where that leaves at least as much memory available as it takes",
    )
    exact_batches: bool | None = Field(
        default=None,
        description="decode batches of several sessions through lean Llama layers give each row the bits of "
        "its step alone, so tokens stay transformers' even at float32 near ties, at ~2.3x the batches' matmul "
        "time; True also gives a session's several rows (a shared session's) their lone bits; False: faster "
        "batches whose last bits may differ; None: exact batches of sessions (not rows) where the layers' "
        "weights fit the CPU's last-level cache (exact rows read them once per row)",
    )
    adapters: list[str] = Field(default_factory=list, description="LoRA adapter directories (farmesh-lora)")
    auth: str = "open"
    auth_key_file: str | None = Field(default=None, description="auth 'token': file holding the mesh's secret key")
    auth_revoked_file: str | None = Field(
        default=None, description="auth 'token': revoked token ids, one per line (re-read when it changes)"
    )
    ledger: str = "null"
    ledger_path: str | None = Field(default=None, description="ledger 'sqlite': the database file")
    kv_cache_bytes: int = Field(default=2 * 1024**3, gt=0, description="memory budget of all sessions' KV caches")
    kv_cache_peer_share: float = Field(default=0.5, gt=0, le=1, description="fraction one peer may hold")
    max_session_length: int = Field(default=8192, gt=0)
    max_batch_size: int = Field(default=64, gt=0)
    max_tokens_per_request: int = Field(default=16384, gt=0, description="batch x sequence of one step")
    max_message_bytes: int = Field(
        default=32 * 1024**2, gt=0, description="largest message accepted; refused before it is read"
    )
    step_timeout: float = Field(default=30.0, gt=0, description="seconds an idle session is kept")
    announce_period: float = Field(default=10.0, gt=0)
    record_ttl: float = Field(default=30.0, gt=0)
    rebalance_period: float = Field(
        default=60.0, ge=0, description="seconds between placement checks of a node given num_layers; 0: never moves"
    )
    rebalance_gain: float = Field(
        default=1.2, gt=1, description="a node moves when the mesh's bottleneck throughput would grow by more"
    )
    drain_timeout: float = Field(
        default=300.0, ge=0, description="seconds a moving node keeps its old layers for the sessions using them"
    )
    num_threads: int | None = Field(
        default=None,
        gt=0,
        description="torch threads of large steps, and of a lone one-token step's matmuls (the rest of "
        "it runs on one); default: torch's",
    )
    spread_threads: bool = Field(
        default=True,
        description="while a step runs on several torch threads, pin them apart (the leading thread to one CPU, "
        "each worker to a share of the others), so that the kernel cannot stack them on one CPU (see "
        "openmp.spread_team)",
    )
    serve_head: bool | None = Field(
        default=None,
        description="load the model's embeddings and LM head where the node serves the last layer, to choose "
        "greedy tokens itself so that a generation loops through the nodes without the client (see "
        "node/token_loop.py); default: where they take at most as much memory as the node's layers, or at most "
        "256 MiB",
    )
    direct_lane: bool = Field(
        default=True,
        description="also serve sessions over a plain TCP port (one TCP round trip per hop instead of two P2P "
        "daemons; authenticated by a ticket obtained over P2P, not encrypted)",
    )

    @property
    def adapter_names(self) -> list[str]:
        """The names of ``adapters`` (see :func:`adapter_name`), as the node announces and accepts them."""
        return [adapter_name(path) for path in self.adapters]

    @field_validator("layers")
    @classmethod
    def _layers_format(cls, value):
        if value is not None:
            parse_layers(value)
        return value

    @model_validator(mode="after")
    def _one_way_to_pick_layers(self):
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give either layers or num_layers, not both")
        return self


class ClientConfig(NetworkConfig):
    """Everything a client needs: the mesh, the routing policy and its patience."""

    model_id: str
    routing: str = "min-latency"
    auth: str = "open"
    auth_token: SecretStr | None = Field(default=None, description="auth 'token': default $FARMESH_TOKEN")
    quantization: str | None = Field(default=None, description="use only nodes announcing this; None: any")
    device: str = "cpu"
    step_timeout: float = Field(
        default=10.0, gt=0, description="seconds to wait for a one-token step of a node before failing over"
    )
    max_retries: int = Field(default=3, ge=0)
    direct_lane: bool | None = Field(
        default=None,
        description="use nodes' direct lanes (plain TCP) where they offer one; default: yes, unless the client "
        "sends credentials (an auth token), which then stay on encrypted P2P",
    )
    push: bool | None = Field(
        default=None,
        description="with direct lanes, each node of a chain sends its output straight to the next node "
        "(the client relays only where that fails); False: the client relays every step; default: push "
        "(a token loop needs it), unless no loop can run (token loops off, or a session of several sequences) "
        "and the chain has several nodes, all on this machine (there relaying measured as quick or quicker)",
    )
    token_loop: bool = Field(
        default=True,
        description="where every node of a chain pushes and the last one announces an LM head, greedy generation "
        "lets that node choose each token and send it round the chain itself (the client reads the answers "
        "and still fails over); False: the client chooses every token",
    )
    adapter: str | None = Field(default=None, description="LoRA adapter name (or the directory nodes loaded)")
    batch_window_ms: float = Field(
        default=2.0,
        ge=0,
        le=1000,
        description="a generation started while this client generates, or soon after it last ran two at once, "
        "waits this long for others to start, and those with prompts of its length and its settings run as "
        "rows of one session (see client/batched_generation.py); 0: each generation its own session",
    )

    @field_validator("adapter")
    @classmethod
    def _adapter_by_name(cls, value):
        return adapter_name(value) if value else None


class NodeRecord(BaseModel):
    """What a Far Node announces in the DHT; records read from the DHT are validated against it."""

    model_config = ConfigDict(extra="ignore")
    peer_id: str = Field(min_length=1, max_length=128)
    start: int = Field(ge=0, le=1_000_000)
    end: int = Field(gt=0, le=1_000_000)
    throughput: float = Field(ge=0, le=1e12, description="tokens per second through the whole span, one-token steps")
    cache_tokens_left: int = Field(ge=0)
    load: float = Field(default=0.0, ge=0, le=1e9, description="sessions being served now")
    state: NodeState = "online"
    version: str = Field(default=__version__, max_length=64)
    model_type: str = Field(default="", max_length=64)
    dtype: str = Field(default="", max_length=64)
    quantization: str = Field(default="none", max_length=64)
    adapters: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=256)
    addrs: list[Annotated[str, Field(max_length=512)]] = Field(default_factory=list, max_length=32)
    direct_lane: bool = Field(default=False, description="the node serves a direct lane (see rpc_direct_ticket)")
    head_dtype: str = Field(
        default="",
        max_length=64,
        description="the dtype of the LM head it chooses tokens with (wire.TokenLoop); '': none",
    )

    @model_validator(mode="after")
    def _range_is_ordered(self):
        if self.end <= self.start:
            raise ValueError("end must be greater than start")
        return self
