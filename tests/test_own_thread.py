"""run_on_own_thread (farmesh_core/node/own_thread.py): a node's multi-threaded torch work runs on a
thread that ends with it, with the torch threads asked for, and the caller gets its result or its error."""

import threading

import pytest
import torch

from farmesh_core.node.own_thread import run_on_own_thread


def test_runs_on_a_new_thread_with_its_threads():
    def work(x: int) -> tuple[int, str, int]:
        return x * 2, threading.current_thread().name, torch.get_num_threads()

    doubled, name, threads = run_on_own_thread(work, 21, threads=1)
    assert doubled == 42 and name != threading.current_thread().name and threads == 1
    assert all(thread.name != name for thread in threading.enumerate())  # it ended, with its OpenMP team


def test_errors_reach_the_caller():
    def fail() -> None:
        raise ValueError("bad layers")

    with pytest.raises(ValueError, match="bad layers"):
        run_on_own_thread(fail)
