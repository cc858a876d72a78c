"""DHT peers and Far Nodes forked from one process that has imported FarMesh, torch and transformers.

A fresh ``farmesh node`` spends ~4 s of CPU importing before it loads a layer, and the suite starts
dozens of them on two cores. Forked from a preloaded parent they serve within ~1 s. Each is still a
process of its own (its own session and process group, stopped by PID with signals), running
``farmesh_core.cli.main`` as the ``farmesh`` command does. Tests that start the command itself (the CLI,
the demo, other environments) keep using ``farmesh_core.launch``.

Run as ``python -m tests.preloaded``, the parent reads one JSON request per line on stdin
(``{"argv": [...], "log": path}``), forks, and answers ``{"pid": N}``; when a child ends it writes
``{"exit": N, "code": C}`` (``C`` as ``Popen.returncode``: minus the signal for a signal), or
``{"error": why}`` if it could not fork. It is single threaded, so nothing is locked at a fork.
"""

import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import cache
from pathlib import Path

from farmesh_core.errors import FarMeshError
from farmesh_core.launch import stop_process


# ---- the preloaded parent ------------------------------------------------------------------------
def _preload() -> None:
    import importlib
    from importlib.metadata import entry_points

    import farmesh_core.cli  # noqa: F401  (farmesh_core first: it sets the OpenMP spin before torch loads)
    import farmesh_core.dht  # noqa: F401
    import farmesh_core.node.far_node  # noqa: F401

    for entry in entry_points(group="farmesh"):  # the adapters' modules; plugins register in the child
        importlib.import_module(entry.module)
    gc.freeze()  # as a Far Node does once it has loaded: no collector walks over all of this


def _child(argv: list[str], out: int | None, parents_fds: tuple[int, ...]) -> None:
    """In the forked child: become a process of its own, then run ``farmesh ARGV``; never returns."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in parents_fds:
            os.close(fd)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null if out is None else out, 1)
        os.dup2(null if out is None else out, 2)
        import random

        import numpy

        random.seed()  # not the parent's sequences, which every sibling shares
        numpy.random.seed()
        from farmesh_core.cli import main

        main(argv)
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1  # as the interpreter would
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    answers = os.dup(1)  # stdout carries the answers only: whatever else prints goes to stderr
    os.dup2(2, 1)
    _preload()
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def say(message: dict) -> None:
        os.write(answers, (json.dumps(message) + "\n").encode())

    say({"ready": True})
    pending = b""
    while True:
        readable, _, _ = select.select([0, wakeup_r], [], [])
        if wakeup_r in readable:
            os.read(wakeup_r, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                say({"exit": pid, "code": os.waitstatus_to_exitcode(status)})
        if 0 in readable:
            data = os.read(0, 65536)
            if not data:  # the test session ended; the children are stopped by whoever started them
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                log = request.get("log")  # made here, so that it is there once the caller has the PID
                try:
                    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if log else None
                except OSError as e:
                    say({"error": f"cannot write the log {log}: {e}"})
                    continue
                pid = os.fork()
                if pid == 0:
                    _child(request["argv"], out, (answers, wakeup_r, wakeup_w))
                if out is not None:
                    os.close(out)
                say({"pid": pid})


# ---- the tests' side -----------------------------------------------------------------------------
class ForkedProcess:
    """A child of the preloaded parent, with the part of ``subprocess.Popen`` the tests use."""

    def __init__(self, pid: int, parent: "PreloadedParent", args: list[str]):
        self.pid, self.args, self._parent = pid, args, parent
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.returncode = self._parent.exit_codes.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        parent = self._parent
        with parent.exited:
            if not parent.exited.wait_for(lambda: self.pid in parent.exit_codes or parent.gone, timeout):
                raise subprocess.TimeoutExpired(self.args, timeout)
        if self.poll() is None:
            raise FarMeshError(f"the preloaded parent died: nothing reports how {self.pid} ends")
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # once reaped its PID may be another process's
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class PreloadedParent:
    """Starts ``python -m tests.preloaded`` and forks ``farmesh`` commands from it."""

    def __init__(self):
        root = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.preloaded"], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.exit_codes: dict[int, int] = {}
        self.exited = threading.Condition()
        self.gone = False  # the parent ended (its stdout closed)
        self._answers: list[int | str] = []  # a PID, or why there is none
        self._lock = threading.Lock()  # one request at a time: answers come in order
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="preloaded-parent", daemon=True)
        self._reader.start()
        if not self._ready.wait(120) or self.gone:
            raise FarMeshError("the preloaded parent did not start")

    def _read(self) -> None:
        for line in self._proc.stdout:
            message = json.loads(line)
            if "exit" in message:
                with self.exited:
                    self.exit_codes[message["exit"]] = message["code"]
                    self.exited.notify_all()
            elif "pid" in message or "error" in message:
                with self.exited:
                    self._answers.append(message.get("pid", message.get("error")))
                    self.exited.notify_all()
            else:
                self._ready.set()
        with self.exited:
            self.gone = True
            self.exited.notify_all()
        self._ready.set()

    def fork(self, *argv: str, log: str | None = None) -> ForkedProcess:
        """Fork ``farmesh ARGV`` (stdout and stderr to ``log``, else nowhere)."""
        with self._lock:
            with self.exited:
                answered = len(self._answers)
            self._proc.stdin.write((json.dumps({"argv": list(argv), "log": log}) + "\n").encode())
            self._proc.stdin.flush()
            with self.exited:
                if not self.exited.wait_for(lambda: len(self._answers) > answered or self.gone, 60) or self.gone:
                    raise FarMeshError("the preloaded parent did not fork")
                pid = self._answers[answered]
        if isinstance(pid, str):
            raise FarMeshError(pid)
        return ForkedProcess(pid, self, ["farmesh", *argv])


def read_dht_addrs(log: Path, proc: ForkedProcess, timeout: float = 60.0) -> list[str]:
    """The multiaddrs a forked ``farmesh dht`` printed, once it says it is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if any(line.startswith("FarMesh DHT peer ready") for line in lines):
            return [line for line in lines if line.startswith("/")]
        if proc.poll() is not None:
            raise FarMeshError(f"farmesh dht exited with code {proc.returncode}")
        time.sleep(0.05)
    raise FarMeshError("farmesh dht printed no multiaddr")


Process = subprocess.Popen | ForkedProcess  # what the tests start: forked here, or the command itself


@cache
def parent() -> PreloadedParent:
    """The test session's preloaded parent (it exits when the session's end closes its stdin)."""
    return PreloadedParent()


def spawn_dht() -> tuple[ForkedProcess, list[str]]:
    """``farmesh dht`` on 127.0.0.1 (a port of its own), forked: the process and its multiaddrs."""
    log = Path(tempfile.mkdtemp(prefix="farmesh-dht-")) / "dht.log"
    proc = parent().fork("dht", "--host", "127.0.0.1", log=str(log))
    try:
        return proc, read_dht_addrs(log, proc)
    except BaseException:
        stop_process(proc)
        raise


def spawn_node(model: str, bootstrap: list[str], *args: str, log_path: str | None = None) -> ForkedProcess:
    """``farmesh node MODEL --dht-bootstrap ... ARGS``, forked (output to ``log_path``)."""
    return parent().fork("node", model, "--dht-bootstrap", *bootstrap, *args, log=log_path)


if __name__ == "__main__":
    _serve()
