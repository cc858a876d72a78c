"""Multi-host: the DHT, two Far Nodes and the client each run in their own network namespace, joined
by a bridge, so no process can reach another over 127.0.0.1. The nodes must announce addresses the
others can dial, and the client's greedy text must equal transformers'.

The test builds the network itself and removes it at the end: a "hub" namespace holding a bridge,
and one namespace per host with a veth pair to the bridge and an address in 10.200.0.0/24. Nothing
is added to the machine's own network namespace, and the namespaces have no route anywhere else.
It needs root and iproute2 (``ip``); without them it is skipped, saying why.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from farmesh_core.checkpoint_maker import make_checkpoint
from farmesh_core.launch import stop_process
from tests.helpers import PROMPT, hf_greedy_text

SUBNET = "10.200.0"
HOSTS = {"dht": 1, "node1": 2, "node2": 3, "client": 4}  # host -> last byte of its address
NEW_TOKENS = 32

CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from farmesh_core.client import DistributedInferenceClient
    from farmesh_core.launch import wait_for_layers

    model_dir, bootstrap, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    wait_for_layers(model_dir, [bootstrap], num_nodes=2, timeout=120)
    with DistributedInferenceClient(model_dir, [bootstrap]) as client:
        text = client.generate(prompt, max_tokens=max_tokens)
        with client.inference_session(max_length=8) as session:
            route = [hop.peer_id for hop in session.route]
        records = [r.model_dump(mode="json") for r in client.mesh.records(refresh=True)]
    print(json.dumps({"text": text, "records": records, "route": route}))
    """
)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class Namespaces:
    """Network namespaces named ``fm<pid>-<host>`` on a bridge in ``fm<pid>-hub``."""

    def __init__(self):
        self.prefix = f"fm{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.created: list[str] = []

    def name(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{HOSTS[host]}"

    def create(self) -> None:
        self._add(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for host, last in HOSTS.items():
            ns, port = self.name(host), f"v{last}"
            self._add(ns)
            ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", self.hub, "link", "set", port, "master", "br0")
            ip("-n", self.hub, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def _add(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.created.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def popen(self, host: str, args: list[str], **kwargs) -> subprocess.Popen:
        """Start ``args`` inside ``host``'s namespace (``ip netns exec`` execs, so the PID is the command's)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name(host), *args], start_new_session=True, **kwargs)

    def remove(self) -> None:
        """SIGKILL whatever still runs in the namespaces (a fallback: tests stop their processes by
        PID first), then delete them; their veth pairs and the bridge go with them."""
        for ns in reversed(self.created):
            for pid in ip("netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.created):
            for _ in range(20):
                if ip("netns", "del", ns, check=False).returncode == 0:
                    break
                time.sleep(0.1)
        self.created.clear()


@pytest.fixture
def namespaces():
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed: network namespaces cannot be created")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    spaces = Namespaces()
    try:
        try:
            spaces.create()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"network namespaces cannot be created here: {' '.join(e.cmd)}: {e.stderr.strip()}")
        yield spaces
    finally:
        spaces.remove()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("multihost") / "tiny-llama"))


def farmesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "farmesh_core.cli", *args]


def read_dht_addrs(proc: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    """The multiaddrs ``farmesh dht`` prints before its ready line."""
    addrs, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if line.startswith("/"):
            addrs.append(line)
        elif line and addrs:
            return addrs
        elif not line and proc.poll() is not None:
            break
    raise AssertionError(f"farmesh dht printed no multiaddr (exit code {proc.poll()})")


@pytest.mark.timeout(300)
def test_dht_nodes_and_client_on_separate_hosts(namespaces, model_dir, tmp_path):
    procs: list[subprocess.Popen] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("node1", "node2")}
    try:
        dht = namespaces.popen(
            "dht", farmesh("dht", "--host", namespaces.address("dht")), stdout=subprocess.PIPE, text=True
        )
        procs.append(dht)
        addrs = read_dht_addrs(dht)
        assert all(f"/ip4/{namespaces.address('dht')}/" in a for a in addrs), addrs
        for host, layers in (("node1", "0:4"), ("node2", "4:8")):
            with open(logs[host], "w") as log:
                cmd = farmesh("node", model_dir, "--dht-bootstrap", addrs[0], "--layers", layers)
                procs.append(namespaces.popen(host, cmd, stdout=log, stderr=subprocess.STDOUT))
        script = tmp_path / "client.py"
        script.write_text(CLIENT_SCRIPT)
        client = namespaces.popen(
            "client",
            [sys.executable, str(script), model_dir, addrs[0], PROMPT, str(NEW_TOKENS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(client)
        try:
            out, err = client.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            client.kill()
            out, err = client.communicate()
        node_logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs.values())
        assert client.returncode == 0, f"the client failed:\n{err[-4000:]}\n{node_logs}"
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in reversed(procs):
            stop_process(proc)

    # Each node announced only its own bridge address: what the other hosts can dial.
    records = sorted(result["records"], key=lambda r: r["start"])
    assert [(r["start"], r["end"]) for r in records] == [(0, 4), (4, 8)]
    for record, host in zip(records, ("node1", "node2"), strict=True):
        assert record["addrs"], record
        assert all(a.startswith(f"/ip4/{namespaces.address(host)}/tcp/") for a in record["addrs"]), record["addrs"]
    assert result["route"] == [r["peer_id"] for r in records]
    assert result["text"] == hf_greedy_text(model_dir, PROMPT, NEW_TOKENS)
