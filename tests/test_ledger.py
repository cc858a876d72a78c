"""Payment ledgers: ``sqlite`` keeps durable usage totals per client and session (prefill and decode
apart, compute time) in a WAL database, committed in the background so ``record`` stays quick.
(A node killed with SIGKILL keeps its usage: tests/e2e/test_private_mesh.py.)"""

import json
import sqlite3
import time

import pytest

from farmesh_core.cli import main
from farmesh_core.config import NodeConfig
from farmesh_core.errors import ConfigError
from farmesh_core.extensions import UsageEvent
from farmesh_core.plugins import get_payment_ledgers
from farmesh_plugins.ledgers import SQLiteLedger, usage_totals


def event(client="alice", session="s1", prefill=0, decode=0, peer="QmAlicePeer", start=0, end=4) -> UsageEvent:
    return UsageEvent(
        node="QmNode", client=client, peer=peer, session=session, start=start, end=end,
        prefill_tokens=prefill, decode_tokens=decode, compute_s=0.001,
    )  # fmt: skip


def rows(path: str) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(
            "SELECT client, session, steps, prefill_tokens, decode_tokens FROM usage ORDER BY client, session"
        ).fetchall()


@pytest.fixture
def ledger(tmp_path):
    ledger = get_payment_ledgers()["sqlite"](NodeConfig(model_id="unused", ledger_path=str(tmp_path / "usage.db")))
    yield ledger
    ledger.close()


def test_the_null_ledger_records_nothing():
    get_payment_ledgers()["null"](NodeConfig(model_id="unused")).record(event(prefill=5))


def test_sqlite_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match="--ledger-path"):
        get_payment_ledgers()["sqlite"](NodeConfig(model_id="unused", ledger="sqlite"))
    with pytest.raises(ConfigError, match="does not exist"):
        SQLiteLedger(str(tmp_path / "no" / "such" / "dir" / "usage.db"))


def test_the_database_is_in_wal_mode(ledger):
    with sqlite3.connect(ledger.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_events_reach_the_database_within_a_flush_interval_without_close(ledger):
    """Another process reading the file sees the usage while the node still runs."""
    ledger.record(event(prefill=7))
    for _ in range(3):
        ledger.record(event(decode=1))
    deadline = time.monotonic() + 2.0
    while not rows(ledger.path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rows(ledger.path) == [("alice", "s1", 4, 7, 3)]


def test_totals_are_kept_per_client_and_session_with_prefill_and_decode_apart(ledger):
    ledger.record(event("alice", "s1", prefill=10))
    ledger.record(event("alice", "s1", decode=1))
    ledger.record(event("alice", "s2", prefill=3))
    ledger.record(event("bob", "s3", prefill=20))
    ledger.record(event("bob", "s3", decode=1))
    ledger.record(event("bob", "s3", decode=1))
    ledger.record(event("bob", "", prefill=64))  # a forward call
    ledger.flush()
    ledger.record(event("alice", "s1", decode=1))  # a later flush adds to the same rows
    ledger.close()
    assert rows(ledger.path) == [
        ("alice", "s1", 3, 10, 2),
        ("alice", "s2", 1, 3, 0),
        ("bob", "", 1, 64, 0),
        ("bob", "s3", 3, 20, 2),
    ]
    totals = {t["client"]: t for t in usage_totals(ledger.path)}
    assert (totals["alice"]["sessions"], totals["alice"]["prefill_tokens"], totals["alice"]["decode_tokens"]) == (
        2,
        13,
        2,
    )
    assert (totals["bob"]["sessions"], totals["bob"]["prefill_tokens"], totals["bob"]["decode_tokens"]) == (1, 84, 2)
    assert totals["bob"]["peers"] == 1 and totals["bob"]["compute_s"] == pytest.approx(0.004)


def test_close_commits_what_is_still_queued(tmp_path):
    path = str(tmp_path / "usage.db")
    ledger = SQLiteLedger(path, flush_interval=60)
    ledger.record(event(prefill=5))
    ledger.close()
    ledger.close()  # twice is fine
    assert rows(path) == [("alice", "s1", 1, 5, 0)]


def test_record_is_quick(ledger):
    """``record`` only queues: tens of thousands of events per second do not slow a node's steps."""
    events = [event(decode=1) for _ in range(20000)]
    began = time.perf_counter()
    for item in events:
        ledger.record(item)
    per_event = (time.perf_counter() - began) / len(events)
    print(f"\nSQLiteLedger.record: {per_event * 1e6:.2f} us per event")
    assert per_event < 100e-6  # about 3 us on an idle machine
    ledger.close()
    assert rows(ledger.path) == [("alice", "s1", 20000, 0, 20000)]


def test_two_nodes_can_share_one_database(tmp_path):
    path = str(tmp_path / "usage.db")
    first, second = SQLiteLedger(path), SQLiteLedger(path)
    first.record(event(prefill=1, start=0, end=4))
    second.record(event(prefill=2, start=4, end=8))
    first.close()
    second.close()
    assert [t["prefill_tokens"] for t in usage_totals(path)] == [3]


def test_usage_cli_prints_totals_per_client(ledger, capsys):
    """``farmesh usage --db PATH [--json] [--sessions]``."""
    ledger.record(event("alice", "s1", prefill=10, decode=0))
    ledger.record(event("bob", "s2", prefill=2, decode=0))
    ledger.close()
    main(["usage", "--db", ledger.path, "--json"])
    totals = json.loads(capsys.readouterr().out)
    assert [(t["client"], t["prefill_tokens"]) for t in totals] == [("alice", 10), ("bob", 2)]
    main(["usage", "--db", ledger.path])
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["client", "sessions"] and "alice" in table and "bob" in table
    main(["usage", "--db", ledger.path, "--sessions", "--json"])
    assert {t["session"] for t in json.loads(capsys.readouterr().out)} == {"s1", "s2"}


def test_usage_of_a_missing_database_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no usage ledger at"):
        usage_totals(str(tmp_path / "nothing.db"))
