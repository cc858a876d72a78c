"""What a new session waits for before its first step reaches a node: a connection to each node's
direct lane (a spare one, opened during the last session, where it can) and the client's view of the
mesh (refreshed in the background while it ages, so that routing does not wait for the DHT)."""

import asyncio
import inspect
import time

import pytest

from farmesh import DistributedInferenceClient
from farmesh_core.client import mesh as mesh_module
from tests.helpers import PROMPT, hf_greedy_ids, prompt_ids

pytestmark = pytest.mark.timeout(120)

TOKENS = 12


@pytest.fixture
def client(llama_mesh):
    """A client of its own: its spares are this test's alone."""
    with DistributedInferenceClient(llama_mesh.model_dir, llama_mesh.addrs) as client:
        yield client


def spares(client: DistributedInferenceClient, expected: int = 0) -> dict:
    """The client's spare connections, once there are ``expected`` of them (they open in the background)."""
    deadline = time.monotonic() + 10
    while len(client.mesh._spares) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return {peer: connection for peer, (_, connection) in client.mesh._spares.items()}


def test_the_next_session_starts_on_the_spare_connections_of_the_last(client, llama_mesh):
    """A session's second step opens a spare connection to each node of its chain; the next session
    starts on them and generates transformers' tokens. A session of one step opens none."""
    ids = prompt_ids(llama_mesh.model_dir)
    with client.inference_session(64) as session:
        session.step(client.head.embed(ids))
    time.sleep(0.5)
    assert spares(client) == {}
    first = [int(t[0]) for t in client.generate_ids(ids, TOKENS)]
    left = spares(client, expected=2)
    assert len(left) == 2
    with client.inference_session(64) as session:
        tokens = [int(t[0]) for t in client.generate_ids(ids, TOKENS, session=session)]
        assert [stream._direct for stream in session._streams] == [left[hop.peer_id] for hop in session.route]
    assert first == tokens == list(hf_greedy_ids(llama_mesh.model_dir, PROMPT, TOKENS))


@pytest.mark.parametrize("why", ["the node ended it", "too old"])
def test_a_spare_connection_the_node_ended_or_too_old_is_not_used(client, llama_mesh, monkeypatch, why):
    """A spare that its node has ended (as it ends a stream silent for its step_timeout), or one older
    than SPARE_MAX_AGE, is closed and the session connects anew: its tokens are right."""
    ids = prompt_ids(llama_mesh.model_dir)
    list(client.generate_ids(ids, TOKENS))
    left = spares(client, expected=2)
    assert len(left) == 2
    if why == "too old":
        monkeypatch.setattr(mesh_module, "SPARE_MAX_AGE", 0.0)
    else:
        for connection in left.values():
            connection.end_requests()  # the node ends the stream, and says so on the connection
        deadline = time.monotonic() + 10
        while any(connection.silent() for connection in left.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
    with client.inference_session(64) as session:
        tokens = [int(t[0]) for t in client.generate_ids(ids, TOKENS, session=session)]
        used = [stream._direct for stream in session._streams]
    assert not any(connection in used for connection in left.values())
    assert session.recoveries == []  # (not a failover: the session never tried them)
    assert tokens == list(hf_greedy_ids(llama_mesh.model_dir, PROMPT, TOKENS))


def test_an_aging_view_of_the_mesh_is_refreshed_in_the_background(llama_mesh, monkeypatch):
    """A route made with records older than REFRESH_AHEAD of their max age uses them and fetches new
    ones in the background, REFRESH_DELAY later (off the way of its session's first token); records
    past their max age are fetched before the route is made."""
    fetch = mesh_module.fetch_node_records
    fetched_at = []

    def slow_fetch(*args, **kwargs):
        fetched_at.append(time.monotonic())
        time.sleep(1.0)  # (a slow DHT, so that waiting for it shows)
        return fetch(*args, **kwargs)

    connection = llama_mesh.connection()
    try:
        connection.records(refresh=True)
        monkeypatch.setattr(mesh_module, "fetch_node_records", slow_fetch)
        aging = 0.75 * mesh_module.RECORDS_MAX_AGE
        connection._records_at -= aging
        began = time.monotonic()
        assert len(connection.route(0, 8)) == 2
        assert time.monotonic() - began < 0.5
        deadline = time.monotonic() + 10
        while time.monotonic() - connection._records_at > 0.5 * aging and time.monotonic() < deadline:
            time.sleep(0.05)
        assert time.monotonic() - connection._records_at < 0.5 * aging  # refreshed meanwhile
        assert fetched_at[0] - began >= mesh_module.REFRESH_DELAY
        connection._records_at -= 2 * mesh_module.RECORDS_MAX_AGE
        began = time.monotonic()
        assert len(connection.route(0, 8)) == 2
        assert time.monotonic() - began >= 1.0
    finally:
        connection.close()


def test_a_refresh_cancelled_while_it_waits_is_closed_unstarted():
    """The client closing while a background refresh waits out REFRESH_DELAY leaves no coroutine that
    was never awaited (Python warned of one at the exit of a benchmark)."""

    async def refresh():
        return "refreshed"

    async def main():
        work = refresh()
        waiting = asyncio.ensure_future(mesh_module._after(10.0, work))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert inspect.getcoroutinestate(work) == inspect.CORO_CLOSED
        assert await mesh_module._after(0.0, refresh()) == "refreshed"

    asyncio.run(main())
