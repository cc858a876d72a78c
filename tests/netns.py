"""Hosts on one machine: a network namespace per host, joined by a bridge in a "hub" namespace.

Used by the multi-host test and by ``benchmarks/bench_latency.py``. Each host gets a veth pair to the
bridge and an address in ``SUBNET``; nothing is added to the machine's own network namespace, and
the namespaces have no route anywhere else. A host may delay every packet it sends (``tc netem``),
as a network between machines would. Needs root and iproute2 (``ip``, ``tc``).
"""

import os
import shutil
import signal
import subprocess
import time

SUBNET = "10.200.0"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed: network namespaces cannot be created"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


class Namespaces:
    """Network namespaces named ``fm<pid>-<host>`` on a bridge in ``fm<pid>-hub``; ``hosts`` maps each
    host to the last byte of its address."""

    def __init__(self, hosts: dict[str, int]):
        self.hosts = hosts
        self.prefix = f"fm{os.getpid()}"
        self.hub = f"{self.prefix}-hub"
        self.created: list[str] = []

    def name(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def address(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts[host]}"

    def create(self) -> None:
        self._add(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")
        for host, last in self.hosts.items():
            ns, port = self.name(host), f"v{last}"
            self._add(ns)
            ip("-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", self.hub, "link", "set", port, "master", "br0")
            ip("-n", self.hub, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def delay(self, host: str, ms: float) -> None:
        """Hold every packet ``host`` sends for ``ms`` milliseconds (one way; a round trip between two
        delayed hosts takes twice that)."""
        subprocess.run(
            ["ip", "netns", "exec", self.name(host), "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
             "delay", f"{ms}ms"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip

    def _add(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.created.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def popen(self, host: str, args: list[str], **kwargs) -> subprocess.Popen:
        """Start ``args`` inside ``host``'s namespace (``ip netns exec`` execs, so the PID is the command's)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name(host), *args], start_new_session=True, **kwargs)

    def remove(self) -> None:
        """SIGKILL whatever still runs in the namespaces (a fallback: callers stop their processes by
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
