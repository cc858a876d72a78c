"""Node processes of one machine claim home CPUs apart (``farmesh_core.home_cpu``), in real processes."""

import os
import subprocess
import sys

from farmesh_core.home_cpu import claim_home_cpu

CLAIM = "import sys; from pathlib import Path; from farmesh_core.home_cpu import claim_home_cpu; "


def claiming_process(folder, cpus: list[int]) -> subprocess.Popen:
    """A process that claims one of ``cpus`` in ``folder``, prints it, and lives until its stdin closes."""
    code = CLAIM + f"print(claim_home_cpu({cpus}, Path({str(folder)!r})), flush=True); sys.stdin.read()"
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_live_processes_claim_the_least_claimed_cpus_and_their_claims_go_with_them(tmp_path):
    first = claiming_process(tmp_path, [0, 1])
    try:
        assert first.stdout.readline().strip() == "0"
        second = claiming_process(tmp_path, [0, 1])
        try:
            assert second.stdout.readline().strip() == "1"  # the other CPU: the chain's nodes lead apart
            assert claim_home_cpu([0, 1, 2], tmp_path) == 2
            assert (tmp_path / str(os.getpid())).read_text() == "2"
        finally:
            second.communicate("")
        assert not (tmp_path / str(second.pid)).exists()  # removed as the process exited
    finally:
        first.communicate("")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == [str(os.getpid())]


def test_a_dead_process_claim_is_dropped(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / dead.stdout.strip()
    stale.write_text("0")
    assert claim_home_cpu([0, 1], tmp_path) == 0
    assert not stale.exists()


def test_no_claim_where_the_folder_cannot_be_made(tmp_path):
    (tmp_path / "file").write_text("")
    assert claim_home_cpu([0, 1], tmp_path / "file" / "claims") is None


def test_a_claim_never_takes_the_latest_claims_cpu_even_where_fewer_lead_from_it(tmp_path):
    """Where nodes left unevenly, the least claimed CPU can be the one the latest node took: the next
    node, most likely its neighbour in a chain, still leads from another."""
    sleepers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)]
    try:
        for age, (sleeper, cpu) in enumerate(zip(sleepers, [1, 1, 0], strict=True)):
            claim = tmp_path / str(sleeper.pid)
            claim.write_text(str(cpu))
            os.utime(claim, ns=(10**18 + age, 10**18 + age))  # the claim of CPU 0 the latest
        assert claim_home_cpu([0, 1], tmp_path) == 1
        assert claim_home_cpu([0, 1, 2], tmp_path / "more") == 0  # (no claims: the first CPU)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
