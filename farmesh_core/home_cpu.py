"""The CPU each Far Node process of a machine leads its steps' threads from: its home CPU, chosen apart
from the other nodes' on the machine.

A node keeps a step's threads apart (``openmp.spread_team``): the leading thread on one CPU, the
workers on the others. A node that picked the CPU its leader happened to run on led from the same
CPU as the other node of a chain on the same machine about half the time, and there both nodes'
workers, and both event loops' work between steps, met on the same CPUs. On 2 CPUs, 8 fresh 2-node
meshes decoded at 3.21-3.56 ms a token where the nodes' workers shared a CPU, and at 2.53-2.70 where
they did not (baseline model).

So each node process claims a CPU that the last live node process of this user on the machine to
claim one did not, the fewest others lead from (the nodes of a chain start together, so each one's
neighbour in the chain is most likely the node that claimed just before it): a file per process in a
shared folder, named by its pid and holding the CPU, written under a lock, and removed when the
process exits (a dead process's claim is dropped by the next one to look).
"""

import atexit
import fcntl
import logging
import os
import tempfile
from contextlib import suppress
from pathlib import Path

logger = logging.getLogger(__name__)


def claims_folder() -> Path:
    return Path(tempfile.gettempdir()) / f"farmesh-home-cpus-{os.getuid()}"


def claim_home_cpu(cpus: list[int], folder: Path | None = None) -> int | None:
    """A CPU of ``cpus`` other than the one the latest live claim in ``folder`` took, the one of those
    that the fewest live processes claimed (the first after the latest one's, in ``cpus``' order),
    now claimed by this process until it exits; None where no claim can be kept there."""
    folder = claims_folder() if folder is None else folder
    pid = os.getpid()
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            claims = _live_claims(folder, pid)  # oldest first
            latest = claims[-1] if claims else None
            after = cpus.index(latest) + 1 if latest in cpus else 0
            ordered = cpus[after:] + cpus[:after]
            candidates = [cpu for cpu in ordered if cpu != latest] or ordered
            home = min(candidates, key=lambda cpu: (claims.count(cpu), ordered.index(cpu)))
            (folder / str(pid)).write_text(str(home))
    except OSError as e:
        logger.debug("no home CPU claimed in %s: %s", folder, e)
        return None
    atexit.register(_drop_claim, folder / str(pid), pid)
    return home


def _live_claims(folder: Path, pid: int) -> list[int]:
    """The CPUs that the live processes other than ``pid`` claimed, the oldest claim first; dead
    processes' claims are removed."""
    claims = []
    for path in folder.iterdir():
        if not path.name.isdigit() or int(path.name) == pid:
            continue
        if not _alive(int(path.name)):
            path.unlink(missing_ok=True)
            continue
        with suppress(OSError, ValueError):
            claims.append((path.stat().st_mtime_ns, int(path.read_text())))
    return [cpu for _, cpu in sorted(claims)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_claim(path: Path, pid: int) -> None:
    if os.getpid() == pid:  # (not in a forked child)
        path.unlink(missing_ok=True)
