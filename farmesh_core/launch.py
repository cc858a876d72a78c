"""Start and stop DHT peers and Far Nodes as separate processes (used by the demo, tests, benchmarks)."""

import os
import signal
import subprocess
import sys
import time

from farmesh_core.config import ClientConfig
from farmesh_core.errors import FarMeshError


def farmesh_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "farmesh_core.cli", *args]


def spawn_dht(host: str = "127.0.0.1", env: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
    """Start ``farmesh dht`` and return the process and the multiaddrs it printed."""
    proc = subprocess.Popen(
        farmesh_command("dht", "--host", host), stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    addrs = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if not line:
            if proc.poll() is not None:
                raise FarMeshError(f"farmesh dht exited with code {proc.returncode}")
            continue
        if line.startswith("/"):
            addrs.append(line)
        elif addrs:
            break
    if not addrs:
        stop_process(proc)
        raise FarMeshError("farmesh dht printed no multiaddr")
    return proc, addrs


def spawn_node(model: str, bootstrap: list[str], *args: str, log_path: str | None = None, env=None) -> subprocess.Popen:
    """Start ``farmesh node MODEL --dht-bootstrap ... ARGS`` in its own process group."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    cmd = farmesh_command("node", model, "--dht-bootstrap", *bootstrap, *args)
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def node_peer_id(log_path: str, timeout: float = 60.0) -> str:
    """The peer id a Far Node logged when it came online (``spawn_node(..., log_path=...)``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            for line in f:
                if "Far Node " in line and " serves layers " in line:
                    return line.split("Far Node ", 1)[1].split()[0]
        time.sleep(0.1)
    raise FarMeshError(f"no Far Node came online according to {log_path}")


def wait_for_layers(model: str, bootstrap: list[str], num_nodes: int = 1, timeout: float = 120.0, procs=()) -> None:
    """Block until every layer of ``model`` is served and at least ``num_nodes`` nodes are online."""
    from farmesh_core.architecture import adapter_for
    from farmesh_core.checkpoint import Checkpoint
    from farmesh_core.dht import fetch_node_records, start_dht

    checkpoint = Checkpoint(model)
    total = adapter_for(checkpoint.config).num_layers(checkpoint.config)
    dht = start_dht(ClientConfig(model_id=model, dht_bootstrap=bootstrap), client_mode=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise FarMeshError(f"a Far Node exited early with code {proc.returncode}")
            records = fetch_node_records(dht, checkpoint.dht_prefix)
            covered = all(any(r.start <= i < r.end for r in records) for i in range(total))
            if covered and len(records) >= num_nodes:
                return
            time.sleep(0.2)
        raise FarMeshError(f"layers of {model} were not all served within {timeout} s")
    finally:
        dht.shutdown()


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process by PID (it withdraws from the DHT and stops its helpers), then SIGKILL its
    whole process group: whatever is left of it, or all of it if it did not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_process_group(proc)


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every process it started (DHT peer, p2p daemon): a crash, for tests."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
