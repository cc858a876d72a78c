"""Built-in payment ledgers: ``null`` (records nothing) and ``sqlite`` (durable usage per client and session).

The sqlite ledger keeps ``record()`` to a queue append (about a microsecond); a background thread
folds the queued events into per-(client, session, layers) totals and commits them to an SQLite
database in WAL mode every ``flush_interval`` seconds (0.5 s), or sooner when ``flush_events`` are
waiting. A node killed with SIGKILL loses at most the events of its last flush interval; a node that
stops normally flushes everything (``close()``). Several nodes may share one database file.
"""

import logging
import os
import queue
import sqlite3
import threading
import time
from typing import Any

from farmesh_core.errors import ConfigError
from farmesh_core.extensions import UsageEvent
from farmesh_core.hookspecs import hookimpl

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    node TEXT NOT NULL,
    client TEXT NOT NULL,
    peer TEXT NOT NULL,
    session TEXT NOT NULL,            -- '' for forward/backward calls
    start_layer INTEGER NOT NULL,
    end_layer INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    prefill_tokens INTEGER NOT NULL,  -- tokens of multi-token steps (prompts, replays, forward/backward)
    decode_tokens INTEGER NOT NULL,   -- tokens of one-token steps
    compute_s REAL NOT NULL,
    first_at REAL NOT NULL,           -- Unix seconds
    last_at REAL NOT NULL,
    PRIMARY KEY (node, client, peer, session, start_layer, end_layer)
)
"""

UPSERT = """
INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (node, client, peer, session, start_layer, end_layer) DO UPDATE SET
    steps = steps + excluded.steps,
    prefill_tokens = prefill_tokens + excluded.prefill_tokens,
    decode_tokens = decode_tokens + excluded.decode_tokens,
    compute_s = compute_s + excluded.compute_s,
    last_at = max(last_at, excluded.last_at)
"""


class NullLedger:
    """Records nothing: for meshes that do not account for usage."""

    def record(self, event: UsageEvent) -> None:
        return None


def _connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=10, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")  # each commit is on disk, not only in the OS cache
    connection.execute(SCHEMA)
    connection.commit()
    return connection


class SQLiteLedger:
    """Usage totals per node, client, peer, session and layer range, in an SQLite database (WAL mode)."""

    def __init__(self, path: str, flush_interval: float = 0.5, flush_events: int = 4096):
        self.path, self.flush_interval, self.flush_events = path, flush_interval, flush_events
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConfigError(f"the ledger directory {directory} does not exist")
        try:
            self._connection = _connect(path)
        except sqlite3.Error as e:
            raise ConfigError(f"cannot open the usage ledger {path}: {e}") from None
        self._queue: queue.SimpleQueue[tuple[UsageEvent, float]] = queue.SimpleQueue()
        self._pending: dict[tuple, list] = {}  # totals not committed yet (kept if a commit fails)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farmesh-ledger", daemon=True)
        self._thread.start()

    def record(self, event: UsageEvent) -> None:
        """Queue ``event``; it reaches the database within ``flush_interval`` seconds."""
        self._queue.put((event, time.time()))
        if self._queue.qsize() >= self.flush_events:
            self._wake.set()

    def flush(self) -> None:
        """Commit every event recorded so far (called by the background thread; safe to call directly)."""
        while True:
            try:
                event, at = self._queue.get_nowait()
            except queue.Empty:
                break
            key = (event.node, event.client, event.peer, event.session, event.start, event.end)
            totals = self._pending.get(key)
            if totals is None:
                self._pending[key] = [1, event.prefill_tokens, event.decode_tokens, event.compute_s, at, at]
            else:
                totals[0] += 1
                totals[1] += event.prefill_tokens
                totals[2] += event.decode_tokens
                totals[3] += event.compute_s
                totals[5] = at
        if not self._pending:
            return
        rows = [(*key, *totals) for key, totals in self._pending.items()]
        with self._connection:  # one transaction: all of it is committed, or none
            self._connection.executemany(UPSERT, rows)
        self._pending.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except sqlite3.Error as e:  # disk full, database locked too long...: retry at the next tick
                logger.warning("The usage ledger %s could not commit (will retry): %s", self.path, e)

    def close(self) -> None:
        """Stop the background thread and commit what is left. Safe to call twice."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)
        try:
            self.flush()
        except sqlite3.Error as e:
            logger.error("The usage ledger %s lost its last events: %s", self.path, e)
        self._connection.close()


def sqlite_ledger(config) -> SQLiteLedger:
    path = getattr(config, "ledger_path", None)
    if not path:
        raise ConfigError("ledger 'sqlite' needs a database file: pass --ledger-path PATH (ledger_path=...)")
    return SQLiteLedger(path)


def usage_totals(path: str, by_session: bool = False) -> list[dict[str, Any]]:
    """Totals per client (or per client and session) from a ledger database, largest first."""
    if not os.path.exists(path):
        raise ConfigError(f"no usage ledger at {path}")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        group = "client, session" if by_session else "client"
        rows = connection.execute(
            f"""SELECT {group}, count(DISTINCT session) FILTER (WHERE session != ''), count(DISTINCT peer),
                       sum(steps), sum(prefill_tokens), sum(decode_tokens), sum(compute_s), min(first_at), max(last_at)
                FROM usage GROUP BY {group}
                ORDER BY sum(prefill_tokens) + sum(decode_tokens) DESC"""
        ).fetchall()
    except sqlite3.Error as e:
        raise ConfigError(f"{path} is not a FarMesh usage ledger: {e}") from None
    finally:
        connection.close()
    names = ["client", *(["session"] if by_session else []), "sessions", "peers", "steps"]
    names += ["prefill_tokens", "decode_tokens", "compute_s", "first_at", "last_at"]
    return [dict(zip(names, row, strict=True)) for row in rows]


def render_usage(totals: list[dict[str, Any]]) -> str:
    """A plain-text table of ``usage_totals``."""
    if not totals:
        return "No usage recorded."
    by_session = "session" in totals[0]
    header = f"{'client':<32} " + (f"{'session':<34} " if by_session else f"{'sessions':>8} ")
    header += f"{'prefill tok':>12} {'decode tok':>11} {'compute s':>10}"
    lines = [header]
    for row in totals:
        line = f"{row['client'][:32]:<32} " + (
            f"{row['session'][:34]:<34} " if by_session else f"{row['sessions']:>8} "
        )
        line += f"{row['prefill_tokens']:>12} {row['decode_tokens']:>11} {row['compute_s']:>10.3f}"
        lines.append(line)
    return "\n".join(lines)


@hookimpl
def farmesh_register_payment_ledgers(register):
    register("null", lambda config: NullLedger())
    register("sqlite", sqlite_ledger)
