"""PushInboxes: pushes for open sessions, and pushes that come before their session opens; and how
PushLinks sends a batch's pushes together."""

import asyncio
import time

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from farmesh_core.errors import RequestError
from farmesh_core.node import push
from farmesh_core.node.push import PushInboxes, PushLinks
from farmesh_core.wire import (
    PushedStep,
    PushTarget,
    decode_meta,
    encode_meta,
    parse_message,
    read_frame,
    serialize_tensor,
    wire_tensor,
)

KEY = "k" * 32
PEER = PeerID(b"\x00\x24" + bytes(36))


def request(
    session_id: str, step: int, key: str = KEY, tokens: int = 1
) -> tuple[PushedStep, runtime_pb2.ExpertRequest]:
    meta = PushedStep(session_id=session_id, key=key, position=step - 1, step=step)
    hidden = serialize_tensor(torch.full((1, tokens, 8), float(step)))
    return meta, runtime_pb2.ExpertRequest(tensors=[hidden], metadata=encode_meta(meta))


def steps(inbox) -> list[int]:
    out = []
    while not inbox.empty():
        step, _ = inbox.get_nowait()
        out.append(step.step)
    return out


def test_a_push_to_an_open_session_goes_into_its_inbox():
    inboxes = PushInboxes()
    inbox = inboxes.open("s", KEY)
    inboxes.deliver(*request("s", 1), PEER)
    step, message = inbox.get_nowait()
    assert (step.position, step.step) == (0, 1) and message.tensors[0].size == [1, 1, 8]


def test_a_wrong_key_for_an_open_session_is_refused():
    inboxes = PushInboxes()
    inbox = inboxes.open("s", KEY)
    with pytest.raises(RequestError, match="wrong push key"):
        inboxes.deliver(*request("s", 1, key="x" * 32), PEER)
    assert inbox.empty()


def test_a_session_id_in_use_is_refused():
    inboxes = PushInboxes()
    inboxes.open("s", KEY)
    with pytest.raises(RequestError, match="in use"):
        inboxes.open("s", KEY)
    inboxes.close("s")
    inboxes.open("s", KEY)  # free again once closed


def test_pushes_before_the_session_opens_wait_for_it_in_order_and_other_keys_are_dropped():
    inboxes = PushInboxes()
    inboxes.deliver(*request("s", 1), PEER)
    inboxes.deliver(*request("s", 2, key="x" * 32), PEER)
    inboxes.deliver(*request("s", 3), PEER)
    inboxes.deliver(*request("other", 1), PEER)
    assert steps(inboxes.open("s", KEY)) == [1, 3]
    assert steps(inboxes.open("s2", KEY)) == []  # nothing of another session's


def test_a_full_inbox_drops_further_pushes_and_says_so():
    inboxes = PushInboxes()
    for step in range(1, push.PUSH_INBOX + 3):
        inboxes.deliver(*request("s", step), PEER)
    assert steps(inboxes.open("s", KEY)) == list(range(1, push.PUSH_INBOX + 1))
    inbox = inboxes.open("t", KEY)
    delivered = [inboxes.deliver(*request("t", step), PEER) for step in range(1, push.PUSH_INBOX + 3)]
    assert delivered == [True] * push.PUSH_INBOX + [False, False]  # (a token loop's push to itself reads this)
    assert steps(inbox) == list(range(1, push.PUSH_INBOX + 1))


def test_held_pushes_are_bounded_in_number_and_bytes(monkeypatch):
    monkeypatch.setattr(push, "EARLY_PUSHES", 3)
    inboxes = PushInboxes()
    assert [inboxes.deliver(*request(f"s{n}", 1), PEER) for n in range(5)] == [True, True, True, False, False]
    assert [len(steps(inboxes.open(f"s{n}", KEY))) for n in range(5)] == [1, 1, 1, 0, 0]

    monkeypatch.setattr(push, "EARLY_PUSHES", 100)
    size = request("x", 1, tokens=64)[1].ByteSize()
    monkeypatch.setattr(push, "EARLY_PUSH_BYTES", 2 * size + size // 2)
    for n in range(3):
        inboxes.deliver(*request(f"b{n}", 1, tokens=64), PEER)
    assert [len(steps(inboxes.open(f"b{n}", KEY))) for n in range(3)] == [1, 1, 0]
    for n in range(2):  # taking them freed their bytes
        inboxes.deliver(*request(f"c{n}", 1, tokens=64), PEER)
    assert [len(steps(inboxes.open(f"c{n}", KEY))) for n in range(2)] == [1, 1]


def test_held_pushes_expire(monkeypatch):
    monkeypatch.setattr(push, "EARLY_PUSHES", 2)
    monkeypatch.setattr(push, "EARLY_PUSH_SECONDS", 0.05)
    inboxes = PushInboxes()
    inboxes.deliver(*request("old", 1), PEER)
    inboxes.deliver(*request("old2", 1), PEER)
    time.sleep(0.1)
    inboxes.deliver(*request("new", 1), PEER)  # room again: the old ones expired
    assert steps(inboxes.open("old", KEY)) == []
    assert steps(inboxes.open("new", KEY)) == [1]


def test_pushes_made_together_leave_at_its_end_in_order():
    """``PushLinks.together``: the pushes of a decode batch are held until it ends and then leave, in
    the order made, as one write to each link (a real loopback connection; the receiving end reads
    them frame by frame, as ``push_server`` does)."""

    async def run() -> tuple[int, list[str], bool]:
        received, ended = bytearray(), asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1 << 16):
                received.extend(data)
            ended.set()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        links = PushLinks(dht=None, prefix="", p2p=None, peer_id="this-node")
        links._writers["next-node"] = writer  # a link as _connect leaves it (it finds the node in the DHT)
        with links.together():
            made = [
                links.push([PushTarget(peer_id="next-node", session_id=f"s{i}", key=KEY, step=1)], 4,
                           wire_tensor(torch.full((1, 1, 8), float(i))))
                for i in range(3)
            ]  # fmt: skip
            await asyncio.sleep(0.05)
            held = len(received)
        writer.close()
        await asyncio.wait_for(ended.wait(), 10)
        reader = asyncio.StreamReader()
        reader.feed_data(bytes(received))
        reader.feed_eof()
        sessions = []
        for _ in range(3):
            _, payload = await read_frame(reader, 1 << 20)
            sessions.append(
                decode_meta(parse_message(payload, runtime_pb2.ExpertRequest).metadata, PushedStep).session_id
            )
        server.close()
        return held, sessions, all(made)

    assert asyncio.run(run()) == (0, ["s0", "s1", "s2"], True)
