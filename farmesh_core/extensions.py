"""The types plugins receive and return: routing requests, usage events, auth and ledger interfaces."""

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from farmesh_core.config import NodeRecord


class RouteHop(BaseModel):
    """One link of a chain: ``peer_id`` runs layers ``start`` (inclusive) to ``end`` (exclusive)."""

    model_config = ConfigDict(frozen=True)
    peer_id: str
    start: int = Field(ge=0)
    end: int = Field(gt=0)


class RouteRequest(BaseModel):
    """Everything a routing policy may use to choose a chain."""

    records: list[NodeRecord]
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    latencies: dict[str, float] = Field(default_factory=dict, description="round-trip seconds by peer id")
    avoid: set[str] = Field(default_factory=set, description="peer ids that failed recently")


class UsageEvent(BaseModel):
    """One served step, as a payment ledger records it.

    ``client`` is what the node's auth provider returned (a token's client name, or the peer id on an
    open mesh); ``peer`` is the caller's peer id, which libp2p authenticates. ``session`` is empty for
    forward and backward calls. Tokens of multi-token steps count as prefill, one-token steps as decode.
    """

    node: str
    client: str
    peer: str = ""
    session: str
    start: int
    end: int
    prefill_tokens: int = 0
    decode_tokens: int = 0
    compute_s: float = 0.0


class AuthProvider(Protocol):
    def credentials(self) -> dict[str, str]:
        """Client side: what to attach to every request."""

    def verify(self, credentials: dict[str, str], peer_id: str) -> str:
        """Node side: return the client's name, or raise RequestError to refuse."""


class PaymentLedger(Protocol):
    def record(self, event: UsageEvent) -> None:
        """Store one usage event; must be quick and must not raise."""

    # Optional: ``close()``, if the ledger has it, is called once when the node stops (flush, release files).
