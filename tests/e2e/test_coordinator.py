"""The Far Mesh Coordinator, end to end: a real ``farmesh dht``, two ``farmesh node`` processes (with
Prometheus endpoints) and a real ``farmesh coordinator`` process on 127.0.0.1, driven with the
``openai`` package and with raw HTTP. The text it serves is what ``DistributedInferenceClient``
generates for the same prompt."""

import asyncio
import json
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from farmesh_core.client import DistributedInferenceClient
from farmesh_core.client.batched_generation import RECENT_S
from farmesh_core.launch import farmesh_command, stop_process, wait_for_layers
from tests.helpers import NUM_LAYERS, PROMPT, hf_greedy_text, hf_tokenizer
from tests.preloaded import Process, spawn_dht, spawn_node

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Coordinator:
    model_dir: str
    addrs: list[str]
    url: str  # http://127.0.0.1:PORT
    model: str  # the name /v1/models lists
    node_metrics: list[str]  # the nodes' metrics URLs

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)


def wait_until_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the coordinator did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def coordinator(tiny_llama, tmp_path_factory):
    """DHT + nodes 0:4 and 4:8 (each with --metrics-port) + ``farmesh coordinator``; stopped by PID."""
    logs = tmp_path_factory.mktemp("coordinator-logs")
    procs: list[Process] = []
    try:
        dht, addrs = spawn_dht()
        procs.append(dht)
        node_metrics = []
        for span in ("0:4", "4:8"):
            port = free_port()
            node_metrics.append(f"http://127.0.0.1:{port}/metrics")
            args = ("--layers", span, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
            procs.append(spawn_node(tiny_llama, addrs, *args, log_path=str(logs / f"node-{span[0]}.log")))
        port, log = free_port(), logs / "coordinator.log"  # started beside the nodes: it finds them as they come
        cmd = farmesh_command("coordinator", tiny_llama, "--dht-bootstrap", *addrs, "--port", str(port))
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        wait_for_layers(tiny_llama, addrs, num_nodes=2, timeout=120, procs=procs[1:])
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, procs[-1], log)
        yield Coordinator(tiny_llama, addrs, url, os.path.basename(tiny_llama), node_metrics)
    finally:
        for proc in reversed(procs):
            stop_process(proc)


@pytest.fixture(scope="module")
def reference(coordinator):
    """``DistributedInferenceClient`` on the same mesh: what the coordinator's text must equal."""
    with DistributedInferenceClient(coordinator.model_dir, coordinator.addrs) as client:
        yield client


def prompt_tokens(model_dir: str, text: str) -> int:
    return len(hf_tokenizer(model_dir)(text).input_ids)


# ---- completions ---------------------------------------------------------------------------------
def test_requests_that_start_together_share_a_session(coordinator, reference):
    """Requests with prompts of one length and the same settings, sent together, run as rows of one
    session (``client/batched_generation.py``) with the default 2 ms window, each with its own text.
    Even at a coordinator that has not been busy lately, where the first request would start at once
    on its own: each request announces itself as it reaches the coordinator, and the first waits for
    those still being parsed and tokenized."""
    prompts = [PROMPT] * 3 + ["The json module"] * 3
    expected = [reference.generate(p, max_tokens=24 + i) for i, p in enumerate(prompts)]

    async def burst() -> list[str]:
        async with httpx.AsyncClient(base_url=coordinator.url, timeout=120) as http:
            requests = [
                http.post("/v1/completions", json={"model": coordinator.model, "prompt": p, "max_tokens": 24 + i,
                                                   "temperature": 0})
                for i, p in enumerate(prompts)
            ]  # fmt: skip
            return [r.json()["choices"][0]["text"] for r in await asyncio.gather(*requests)]

    def shared_rows() -> float:
        return sample(httpx.get(f"{coordinator.url}/metrics").text, "farmesh_coordinator_shared_session_rows")

    for attempt in range(2):  # a second try, should a request reach a busy machine's coordinator too late
        served = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{coordinator.url}/metrics").text.splitlines()
                     if line.startswith("farmesh_coordinator_requests_total{"))  # fmt: skip
        if attempt or served:  # first in this module so as to find the coordinator fresh; else idle it
            time.sleep(RECENT_S)
        before = shared_rows()
        assert asyncio.run(burst()) == expected
        if (shared := shared_rows() - before) == len(prompts):
            break
    assert shared == len(prompts)  # two sessions of 3 rows


def test_completion_equals_client_greedy_output(coordinator, reference):
    """``temperature=0`` serves exactly ``DistributedInferenceClient.generate`` greedy text (which is
    transformers' greedy text), with usage."""
    expected = reference.generate(PROMPT, max_tokens=MAX_TOKENS)
    assert expected == hf_greedy_text(coordinator.model_dir, PROMPT, MAX_TOKENS)
    result = coordinator.openai().completions.create(
        model=coordinator.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert result.object == "text_completion" and result.model == coordinator.model
    (choice,) = result.choices
    assert choice.text == expected
    assert choice.finish_reason == "length"
    assert result.usage.prompt_tokens == prompt_tokens(coordinator.model_dir, PROMPT)
    assert result.usage.completion_tokens == MAX_TOKENS
    assert result.usage.total_tokens == result.usage.prompt_tokens + MAX_TOKENS


def test_sampling_defaults_come_from_the_generation_config(coordinator):
    """Without ``temperature``, the checkpoint's generation config decides, as in transformers'
    ``generate``: the tiny checkpoint's does not set ``do_sample``, so the text is the greedy one (here
    12 tokens, which end inside a multi-byte character: the text keeps transformers' U+FFFD for it)."""
    result = coordinator.openai().completions.create(model=coordinator.model, prompt=PROMPT, max_tokens=12)
    assert result.choices[0].text == hf_greedy_text(coordinator.model_dir, PROMPT, 12)


def test_streamed_completion_sends_a_chunk_per_token(coordinator, reference):
    """``stream=True``: one chunk per token, then one with the finish reason, usage when asked."""
    expected = reference.generate(PROMPT, max_tokens=MAX_TOKENS)
    stream = coordinator.openai().completions.create(
        model=coordinator.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    token_chunks = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert len(token_chunks) == MAX_TOKENS
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_stop_sequence_cuts_the_text(coordinator, reference):
    """The text ends before the first stop sequence, with finish_reason "stop", streamed or not."""
    full = reference.generate(PROMPT, max_tokens=MAX_TOKENS)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.find(stop)]
    client = coordinator.openai()
    result = client.completions.create(
        model=coordinator.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < MAX_TOKENS
    stream = client.completions.create(
        model=coordinator.model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected


def test_sampling_with_a_seed_repeats(coordinator, reference):
    """``seed`` makes sampling repeatable, and matches the client's sampling with that seed."""
    options = dict(max_tokens=16, temperature=0.8, top_p=0.95, seed=7)
    client = coordinator.openai()
    first = client.completions.create(model=coordinator.model, prompt=PROMPT, **options).choices[0].text
    second = client.completions.create(model=coordinator.model, prompt=PROMPT, **options).choices[0].text
    assert first == second == reference.generate(PROMPT, **options)


# ---- chat completions ----------------------------------------------------------------------------
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is logging?"}]
CHAT_PROMPT = "system: You are terse.\nuser: What is logging?\nassistant:"  # no chat template: role lines


def test_chat_completion_uses_role_lines_without_a_chat_template(coordinator, reference):
    """A tokenizer without a chat template gets ``role: content`` lines and ``assistant:``."""
    expected = reference.generate(CHAT_PROMPT, max_tokens=MAX_TOKENS)
    result = coordinator.openai().chat.completions.create(
        model=coordinator.model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert result.object == "chat.completion"
    (choice,) = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected
    assert result.usage.prompt_tokens == prompt_tokens(coordinator.model_dir, CHAT_PROMPT)
    assert result.usage.completion_tokens == MAX_TOKENS
    assert result.usage.total_tokens == result.usage.prompt_tokens + MAX_TOKENS


def test_streamed_chat_completion(coordinator, reference):
    """The stream opens with the assistant role, sends a delta per token, ends with the finish reason."""
    expected = reference.generate(CHAT_PROMPT, max_tokens=MAX_TOKENS)
    stream = coordinator.openai().chat.completions.create(
        model=coordinator.model, messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) == 1 + MAX_TOKENS + 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_three_concurrent_requests_all_succeed(coordinator, reference):
    """Three requests at once (each in its own inference session) each get their own right text."""
    prompts = [PROMPT, "The json module", "The textwrap module"]
    expected = [reference.generate(p, max_tokens=32) for p in prompts]
    client = coordinator.openai()

    def complete(prompt: str) -> str:
        result = client.completions.create(model=coordinator.model, prompt=prompt, max_tokens=32, temperature=0)
        return result.choices[0].text

    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(complete, prompts)) == expected


def test_streams_run_at_once_and_stop_when_their_client_leaves(coordinator):
    """Three long streams generate at the same time; closing them ends their generations (and sessions)."""
    client = coordinator.openai()
    streams = [
        client.completions.create(
            model=coordinator.model,
            prompt=prompt,
            max_tokens=1500,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": 1500},
        )
        for prompt in (PROMPT, "The json module", "The textwrap module")
    ]
    try:
        for stream in streams:
            assert next(iter(stream)).choices[0].finish_reason is None
        assert sample(httpx.get(f"{coordinator.url}/metrics").text, "farmesh_coordinator_active_generations") == 3
    finally:
        for stream in streams:
            stream.close()
    deadline = time.monotonic() + 30
    while sample(httpx.get(f"{coordinator.url}/metrics").text, "farmesh_coordinator_active_generations") > 0:
        assert time.monotonic() < deadline, "the generations went on after their clients left"
        time.sleep(0.2)


# ---- the other endpoints -------------------------------------------------------------------------
def test_models_lists_the_served_model(coordinator):
    """``/v1/models`` lists the checkpoint's directory name; the full path is accepted as well."""
    assert [m.id for m in coordinator.openai().models.list()] == [coordinator.model]
    result = coordinator.openai().completions.create(model=coordinator.model_dir, prompt=PROMPT, max_tokens=2)
    assert result.usage.completion_tokens == 2


def test_health_reports_a_complete_mesh(coordinator):
    health = httpx.get(f"{coordinator.url}/health").json()
    assert health["status"] == "ok"
    assert health["online_nodes"] == 2 and health["missing_layers"] == []


def test_mesh_endpoint_is_farmesh_status_json(coordinator):
    """``/v1/mesh`` has the shape of ``farmesh status --json``: both nodes, every layer served once."""
    status = httpx.get(f"{coordinator.url}/v1/mesh").json()
    assert set(status) == {
        "model", "dht_prefix", "num_layers", "nodes", "nodes_per_layer", "missing_layers", "single_node_layers",
    }  # fmt: skip
    assert status["num_layers"] == NUM_LAYERS
    assert sorted((n["start"], n["end"], n["state"]) for n in status["nodes"]) == [(0, 4, "online"), (4, 8, "online")]
    assert status["missing_layers"] == [] and status["nodes_per_layer"] == [1] * NUM_LAYERS


def test_metrics_count_requests_and_tokens(coordinator):
    """The coordinator's ``/metrics`` and each node's metrics port speak Prometheus' text format."""
    coordinator.openai().completions.create(model=coordinator.model, prompt=PROMPT, max_tokens=4, temperature=0)
    text = httpx.get(f"{coordinator.url}/metrics").text
    assert 'farmesh_coordinator_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'farmesh_coordinator_tokens_total{kind="completion"}' in text
    assert "farmesh_coordinator_time_to_first_token_seconds_bucket" in text
    for url in coordinator.node_metrics:
        node = httpx.get(url).text
        assert sample(node, 'farmesh_node_requests_total{rpc="inference"}') >= 1
        assert sample(node, 'farmesh_node_step_seconds_count{kind="decode"}') >= 3
        assert sample(node, "farmesh_node_kv_cache_total_bytes") > 0
        assert "farmesh_node_active_sessions" in node


def sample(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.rsplit(" ", 1)[1])


# ---- errors --------------------------------------------------------------------------------------
MALFORMED = [
    # (endpoint, body, status, param)
    ("completions", {"model": "MODEL"}, 422, "prompt"),  # missing field
    ("chat/completions", {"model": "MODEL"}, 422, "messages"),
    ("chat/completions", {"model": "MODEL", "messages": [{"content": "hi"}]}, 422, "messages.0.role"),
    ("completions", {"prompt": "x"}, 422, "model"),
    ("completions", {"model": "MODEL", "prompt": "x", "max_tokens": "ten"}, 422, "max_tokens"),  # wrong type
    ("completions", {"model": "MODEL", "prompt": "x", "temperature": "hot"}, 422, "temperature"),
    ("chat/completions", {"model": "MODEL", "messages": "hi"}, 422, "messages"),
    ("completions", {"model": "MODEL", "prompt": "x", "n": 2}, 400, "n"),  # bad values
    ("chat/completions", {"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
    ("completions", {"model": "MODEL", "prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ("completions", {"model": "MODEL", "prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("completions", {"model": "MODEL", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("chat/completions", {"model": "MODEL", "messages": []}, 400, "messages"),
    ("completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),  # unknown model
    ("chat/completions", {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), MALFORMED)
def test_malformed_requests_get_openai_errors(coordinator, endpoint, body, status, param):
    """Missing fields and wrong types: 422; bad values: 400; an unknown model: 404; each an OpenAI
    error object naming the parameter."""
    body = json.loads(json.dumps(body).replace('"MODEL"', json.dumps(coordinator.model)))
    response = httpx.post(f"{coordinator.url}/v1/{endpoint}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_body_that_is_not_json_is_a_400(coordinator):
    response = httpx.post(
        f"{coordinator.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_openai_client_raises_the_matching_errors(coordinator):
    """What an ``openai`` user sees: BadRequestError for n=2 or a negative max_tokens, NotFoundError
    for an unknown model; the coordinator keeps serving afterwards."""
    client = coordinator.openai()
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=coordinator.model, prompt=PROMPT, n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=coordinator.model, messages=CHAT, max_tokens=-1)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert client.completions.create(model=coordinator.model, prompt=PROMPT, max_tokens=1).usage.completion_tokens == 1


def test_a_mesh_without_the_layers_is_a_503(coordinator):
    """When no chain of nodes covers the model (here: nobody serves the prefix), requests get a 503
    that says which layers lack a node, streamed or not."""
    from starlette.testclient import TestClient

    from farmesh_core.coordinator import MeshEngine, create_app

    client = DistributedInferenceClient(coordinator.model_dir, coordinator.addrs, dht_prefix="nobody-serves-this")
    try:
        with TestClient(create_app(MeshEngine(client))) as http:
            for stream in (False, True):
                body = {"model": coordinator.model, "prompt": PROMPT, "max_tokens": 4, "stream": stream}
                response = http.post("/v1/completions", json=body)
                assert response.status_code == 503, response.text
                error = response.json()["error"]
                assert "have no node" in error["message"] and error["param"] is None
            assert http.get("/health").json()["status"] == "degraded"
    finally:
        client.close()
