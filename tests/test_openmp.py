"""release_worker_threads (farmesh_core/node/openmp.py): the OpenMP worker threads a thread's
multi-threaded torch op started end when it is called, and start again with the next such op."""

import os
import threading

import torch

from farmesh_core.node.openmp import release_worker_threads


def threads_of_this_process() -> int:
    return len(os.listdir("/proc/self/task"))


def test_workers_end_on_release_and_come_back():
    counts: list[int] = []

    def work() -> None:
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        counts.append(threads_of_this_process())
        for _ in range(3):
            a @ a  # a parallel region: starts this thread's OpenMP worker
            counts.append(threads_of_this_process())
            release_worker_threads()
            counts.append(threads_of_this_process())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    alone, *cycles = counts
    assert cycles == [alone + 1, alone] * 3
