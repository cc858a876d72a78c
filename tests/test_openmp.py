"""farmesh_core/openmp.py: release_worker_threads (the OpenMP worker threads a thread's multi-threaded
torch op started end when it is called, and start again with the next such op), thread counts, and
spread_team (a team's threads on CPUs of their own)."""

import json
import os
import subprocess
import sys

from farmesh_core.openmp import worker_cpus

_CYCLES = """
import os, threading, time
import torch
from farmesh_core.openmp import release_worker_threads

def threads_of_this_process():
    return len(os.listdir("/proc/self/task"))

def settled(expected):
    # An ended OpenMP worker leaves /proc a moment after omp_pause_resource_all returns.
    deadline = time.monotonic() + 5
    while threads_of_this_process() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads_of_this_process()

counts = []

def work():
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    alone = threads_of_this_process()
    counts.append(alone)
    for _ in range(3):
        a @ a  # a parallel region: starts this thread's OpenMP worker
        counts.append(threads_of_this_process())
        release_worker_threads()
        counts.append(settled(alone))

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(*counts)
"""


def test_workers_end_on_release_and_come_back():
    # In a fresh process, so that no other test's threads come or go while it counts.
    alone, *cycles = (int(count) for count in _fresh_python(_CYCLES).split())
    assert cycles == [alone + 1, alone] * 3


def _fresh_python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_importing_farmesh_shortens_the_openmp_spin_unless_torch_came_first_or_it_is_set():
    show = "import os, farmesh_core; print(os.environ.get('GOMP_SPINCOUNT'), farmesh_core.OPENMP_SPIN_SET)"
    assert _fresh_python(show) == "5000 True"
    assert _fresh_python("import torch; " + show) == "None False"  # too late: FarNode warns
    assert _fresh_python("import torch; " + show, GOMP_SPINCOUNT="300000") == "300000 True"
    assert _fresh_python(show, GOMP_SPINCOUNT="100") == "100 True"


_LATER_COUNT = """
import threading
import torch
from farmesh_core.openmp import set_thread_count

def counts(set_count):
    started, other_set, out = threading.Event(), threading.Event(), []

    def worker():
        set_count(2)
        started.set()
        other_set.wait()
        out.append(torch.get_num_threads())  # its first use: ATen's lazy per-thread count

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    torch.set_num_threads(1)  # another thread sets its own count meanwhile
    other_set.set()
    thread.join()
    return out[0]

print(counts(torch.set_num_threads), counts(set_thread_count))
"""


def test_a_threads_own_count_holds_when_another_thread_sets_one_later():
    """torch's plain set_num_threads loses to ATen's lazy count (the last one any thread set);
    set_thread_count holds (a node's compute worker ran its large steps on 1 thread without it)."""
    assert _fresh_python(_LATER_COUNT) == "1 2"


_SPREAD = """
import json, os, threading
import torch
from farmesh_core import openmp

openmp.spreading = SPREADING
out = {"cpus": sorted(os.sched_getaffinity(0))}

def a_team_at_work(name):
    before = set(os.listdir("/proc/self/task"))
    a = torch.randn(256, 256)
    with openmp.torch_threads(2):
        a @ a  # a parallel region of 2 threads
        workers = set(os.listdir("/proc/self/task")) - before
        out[name] = {
            "lead": sorted(os.sched_getaffinity(0)),
            "workers": [sorted(os.sched_getaffinity(int(tid))) for tid in workers],
        }
    out[name]["lead_after"] = sorted(os.sched_getaffinity(0))
    openmp.release_worker_threads()  # the next team has new workers, which start where their lead runs

def work():
    torch.set_num_threads(1)
    a_team_at_work("first")
    a_team_at_work("again")

thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps(out))
"""


def test_a_spread_team_gives_each_of_its_threads_a_cpu_of_their_own_while_it_works():
    """With ``spreading`` on (a Far Node), a team of 2 torch threads has its lead thread pinned to one
    CPU while the block runs and its worker to the others, and the lead free again after; a released
    team's new worker is pinned again. Off, the kernel places them (as in a client)."""
    spread = json.loads(_fresh_python(_SPREAD.replace("SPREADING", "True")))
    cpus = spread["cpus"]
    for team in (spread["first"], spread["again"]):
        assert team["lead_after"] == cpus
        assert len(team["workers"]) == 1
        if len(cpus) >= 2:  # the lead on one CPU, its one worker on all the others
            assert len(team["lead"]) == 1
            assert team["workers"][0] == [cpu for cpu in cpus if cpu not in team["lead"]]
        else:  # one CPU: nothing to spread over
            assert team["lead"] == team["workers"][0] == cpus
    left = json.loads(_fresh_python(_SPREAD.replace("SPREADING", "False")))
    for team in (left["first"], left["again"]):
        assert team["lead"] == team["lead_after"] == left["cpus"]
        assert team["workers"] == [left["cpus"]]


def test_a_teams_workers_go_apart_from_their_lead_and_from_each_other():
    """openmp.worker_cpus: on 2 CPUs a worker takes the CPU its lead does not; with fewer threads than
    CPUs each worker gets a share of the other CPUs, the shares disjoint and covering them; with more
    threads than CPUs they go round the CPUs from the lead's, none carrying more than one more than another."""
    assert worker_cpus([0, 1], 1, 2) == {1: {0}}
    assert worker_cpus([0, 1], 0, 2) == {1: {1}}
    shares = worker_cpus(list(range(16)), 3, 4)
    assert set().union(*shares.values()) == set(range(16)) - {3}
    assert sum(len(share) for share in shares.values()) == 15  # disjoint
    assert sorted(len(share) for share in shares.values()) == [5, 5, 5]
    assert worker_cpus([0, 1], 0, 4) == {1: {1}, 2: {0}, 3: {1}}  # 2 threads on each CPU, the lead's included
    loads = [0] * 4
    for share in worker_cpus([4, 5, 6, 7], 6, 10).values():
        (cpu,) = share
        loads[cpu - 4] += 1
    loads[6 - 4] += 1  # the lead's
    assert max(loads) - min(loads) <= 1
