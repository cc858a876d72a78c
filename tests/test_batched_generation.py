"""GenerationBatcher: which calls share a session, and what each caller gets from it.

The sessions here are plain generators standing in for the client's decode loop (the e2e tests in
tests/e2e/test_concurrency.py run the real one through Far Nodes): row ``i``'s token at step ``s``
is ``100 * prompt + s``, so each caller can tell its own tokens.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from farmesh_core.client import batched_generation
from farmesh_core.client.batched_generation import GenerationBatcher

EOS = 7


class Runs:
    """The alone and batch runs of one test, with what they were asked to do."""

    def __init__(self, fail_at: int | None = None):
        self.alone_calls: list[int] = []  # the prompt of every call run alone
        self.batches: list[list[int]] = []  # the prompts of every batch
        self.closed: list[list[int]] = []  # batches whose session ended (generator closed or done)
        self.steps = 0  # steps taken by batches
        self.fail_at = fail_at  # a batch raises before yielding this step (1: before the first token)
        self.eos_at: dict[int, int] = {}  # prompt -> the step at which its row's token is EOS

    def token(self, prompt: int, step: int) -> int:
        return EOS if self.eos_at.get(prompt) == step else 100 * prompt + step

    def alone(self, prompt: int, max_new_tokens: int):
        def run():
            self.alone_calls.append(prompt)
            for step in range(1, max_new_tokens + 1):
                yield torch.tensor([self.token(prompt, step)])
                if self.eos_at.get(prompt) == step:
                    return
                time.sleep(0.001)

        return run

    def batch(self, rows: torch.Tensor, max_new_tokens: int):
        prompts = rows[:, 0].tolist()
        self.batches.append(prompts)
        try:
            for step in range(1, max_new_tokens + 1):
                if step == self.fail_at:
                    raise ConnectionError("the node went away")
                self.steps += 1
                yield torch.tensor([self.token(p, step) for p in prompts])
                time.sleep(0.001)
        finally:
            self.closed.append(prompts)


def call(
    batcher: GenerationBatcher, runs: Runs, prompt: int, max_new_tokens: int = 5, key="k", read: int | None = None
):
    """One generation of ``prompt``'s row; ``read``: stop reading after that many tokens."""
    ids = torch.tensor([[prompt, 0, 0]])
    tokens = batcher.generate(ids, max_new_tokens, key, runs.alone(prompt, max_new_tokens), runs.batch)
    out = []
    for token in tokens:
        out.append(int(token[0]))
        if read is not None and len(out) == read:
            tokens.close()
            break
    return out


@pytest.fixture
def busy():
    """A generation of the batcher's client that runs until the test ends (batches form only then)."""
    batcher = GenerationBatcher(window_s=0.2, eos_ids={EOS})
    release = threading.Event()

    def blocking():
        release.wait()
        yield torch.tensor([0])

    thread = threading.Thread(target=lambda: list(batcher.generate(torch.zeros(1, 1), 1, None, blocking, None)))
    thread.start()
    while batcher._running == 0:
        time.sleep(0.001)
    yield batcher
    release.set()
    thread.join()


def together(batcher: GenerationBatcher, runs: Runs, calls: list[dict]) -> list[list[int]]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda kwargs: call(batcher, runs, **kwargs), calls))


def test_a_lone_call_runs_at_once_alone():
    batcher, runs = GenerationBatcher(window_s=10.0, eos_ids={EOS}), Runs()
    began = time.perf_counter()
    assert call(batcher, runs, 1) == [101, 102, 103, 104, 105]
    assert time.perf_counter() - began < 5.0  # it did not wait the window
    assert runs.alone_calls == [1] and runs.batches == [] and batcher.batches == 0


def test_calls_made_together_while_busy_share_one_session(busy):
    runs = Runs()
    outputs = together(busy, runs, [{"prompt": p} for p in (1, 2, 3, 4)])
    assert outputs == [[100 * p + s for s in range(1, 6)] for p in (1, 2, 3, 4)]
    assert sorted(runs.batches[0]) == [1, 2, 3, 4] and len(runs.batches) == 1 and runs.alone_calls == []
    assert (busy.batches, busy.batched_rows) == (1, 4)


def test_each_row_ends_at_its_own_eos_and_length(busy):
    runs = Runs()
    runs.eos_at[2] = 2
    outputs = together(
        busy, runs, [{"prompt": 1, "max_new_tokens": 3}, {"prompt": 2}, {"prompt": 3, "max_new_tokens": 6}]
    )
    assert outputs == [[101, 102, 103], [201, EOS], [301, 302, 303, 304, 305, 306]]
    assert len(runs.batches) == 1 and runs.steps == 6  # as long as the longest row needs, no longer


def test_a_caller_that_stops_reading_leaves_the_others_going(busy):
    runs = Runs()
    outputs = together(busy, runs, [{"prompt": 1, "read": 1}, {"prompt": 2, "max_new_tokens": 8}])
    assert outputs == [[101], [200 + s for s in range(1, 9)]]
    assert len(runs.closed) == 1


def test_the_session_closes_when_every_caller_stopped_reading(busy):
    runs = Runs()
    outputs = together(busy, runs, [{"prompt": p, "max_new_tokens": 1000, "read": 2} for p in (1, 2)])
    assert outputs == [[101, 102], [201, 202]]
    deadline = time.monotonic() + 10
    while not runs.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runs.closed and runs.steps < 100  # the session stopped soon, not after 1000 steps


def test_different_settings_or_lengths_make_different_sessions(busy):
    runs = Runs()
    outputs = together(busy, runs, [{"prompt": 1, "key": "a"}, {"prompt": 2, "key": "a"}, {"prompt": 3, "key": "b"}])
    assert outputs == [[100 * p + s for s in range(1, 6)] for p in (1, 2, 3)]
    assert sorted(map(sorted, runs.batches)) == [[1, 2]] and runs.alone_calls == [3]  # alone in its window


def test_calls_that_may_not_share_run_alone(busy):
    runs = Runs()
    outputs = together(busy, runs, [{"prompt": p, "key": None} for p in (1, 2)])
    assert outputs == [[100 * p + s for s in range(1, 6)] for p in (1, 2)]
    assert runs.batches == [] and sorted(runs.alone_calls) == [1, 2]


def test_a_batch_that_fails_before_its_first_token_runs_each_row_alone(busy):
    runs = Runs(fail_at=1)
    outputs = together(busy, runs, [{"prompt": p} for p in (1, 2, 3)])
    assert outputs == [[100 * p + s for s in range(1, 6)] for p in (1, 2, 3)]
    assert sorted(runs.alone_calls) == [1, 2, 3] and busy.unstarted == 1


def test_a_batch_that_fails_later_raises_in_every_caller_after_its_tokens(busy):
    runs = Runs(fail_at=3)
    got: list[list[int]] = [[], []]

    def reader(i: int) -> None:
        with pytest.raises(ConnectionError, match="went away"):
            for token in busy.generate(torch.tensor([[i + 1, 0]]), 5, "k", runs.alone(i + 1, 5), runs.batch):
                got[i].append(int(token[0]))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == [[101, 102], [201, 202]] and runs.alone_calls == []


def test_a_full_batch_leaves_the_next_calls_to_another(busy, monkeypatch):
    monkeypatch.setattr(batched_generation, "MAX_ROWS", 2)
    runs = Runs()
    outputs = together(busy, runs, [{"prompt": p} for p in (1, 2, 3, 4)])
    assert outputs == [[100 * p + s for s in range(1, 6)] for p in (1, 2, 3, 4)]
    assert sorted(map(len, runs.batches)) == [2, 2] and runs.alone_calls == []


def test_a_client_that_ran_generations_together_lately_waits_for_company(monkeypatch):
    """After two calls ran at once, the first call of the next burst waits the window and takes the
    others with it (rather than running alone beside them); a lone one that finds no company runs
    alone after the window. Without recent company (``RECENT_S`` past), a call starts at once."""
    batcher = GenerationBatcher(window_s=0.2, eos_ids={EOS})
    runs = Runs()
    assert together(batcher, runs, [{"prompt": p, "max_new_tokens": 20} for p in (1, 2, 3)])
    assert batcher.batches == 1 and len(runs.alone_calls) == 1  # the very first call ran alone
    outputs = together(batcher, runs, [{"prompt": p} for p in (4, 5, 6)])
    assert outputs == [[100 * p + s for s in range(1, 6)] for p in (4, 5, 6)]
    assert sorted(runs.batches[-1]) == [4, 5, 6] and batcher.batches == 2
    began = time.perf_counter()
    assert call(batcher, runs, 7) == [701, 702, 703, 704, 705]
    assert time.perf_counter() - began >= 0.2 and runs.alone_calls[-1] == 7  # waited, found none
    monkeypatch.setattr(batched_generation, "RECENT_S", 0.0)
    began = time.perf_counter()
    assert call(batcher, runs, 8) == [801, 802, 803, 804, 805]
    assert time.perf_counter() - began < 0.2 and runs.alone_calls[-1] == 8


def test_calls_announced_on_their_way_are_waited_for_and_share(monkeypatch):
    """Calls that do work of their own before they reach the batcher announce themselves: the first
    to arrive expects them (though the client never ran two at once before), and its window waits
    until they are all there."""
    monkeypatch.setattr(batched_generation, "ARRIVAL_WAIT_S", 5.0)
    batcher, runs = GenerationBatcher(window_s=0.01, eos_ids={EOS}), Runs()
    all_announced = threading.Barrier(3, timeout=10)

    def announced_call(prompt: int) -> list[int]:
        with batcher.announce():
            all_announced.wait()
            time.sleep(0.1 * (prompt - 1))  # the preparation: 0, 0.1 and 0.2 s, far past the window
            return call(batcher, runs, prompt)

    with ThreadPoolExecutor(3) as pool:
        outputs = list(pool.map(announced_call, (1, 2, 3)))
    assert outputs == [[100 * p + s for s in range(1, 6)] for p in (1, 2, 3)]
    assert [sorted(b) for b in runs.batches] == [[1, 2, 3]] and runs.alone_calls == []
    assert batcher._arriving == 0


def test_a_window_waits_for_an_announced_call_until_it_arrives_elsewhere_or_at_most_arrival_wait(monkeypatch):
    """An announced call that goes another way says so (``arrive``) and the window waits no more; one
    that never comes holds a window for ``ARRIVAL_WAIT_S`` at most."""
    batcher, runs = GenerationBatcher(window_s=0.01, eos_ids={EOS}), Runs()
    arrive_now, finished = threading.Event(), threading.Event()

    def on_its_way(arrives: bool) -> None:
        with batcher.announce():
            if arrives:
                arrive_now.wait()
                batcher.arrive()  # e.g. transformers' own loop: it will not share
            finished.wait()

    for arrives, wait_s in ((True, 5.0), (False, 0.3)):
        monkeypatch.setattr(batched_generation, "ARRIVAL_WAIT_S", wait_s)
        arrive_now.clear()
        finished.clear()
        other = threading.Thread(target=on_its_way, args=(arrives,))
        other.start()
        while batcher._arriving == 0:
            time.sleep(0.001)
        threading.Timer(0.2, arrive_now.set).start()
        began = time.perf_counter()
        outputs = together(batcher, runs, [{"prompt": 1}, {"prompt": 2}])  # the first expects the announced one
        elapsed = time.perf_counter() - began
        finished.set()
        other.join()
        assert outputs == [[100 * p + s for s in range(1, 6)] for p in (1, 2)]
        assert sorted(runs.batches[-1]) == [1, 2]
        assert (0.2 if arrives else 0.3) <= elapsed < 4.0, (arrives, elapsed)
    assert batcher._arriving == 0
