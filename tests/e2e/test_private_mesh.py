"""A private mesh, end to end with real processes: a Far Node started with ``--auth token`` serves only
holders of a valid token from the mesh operator; ``--quantization int8`` is announced in the DHT and a
client can require it; a node with the sqlite ledger keeps its usage through a SIGKILL.

The module's mesh: one DHT, node "private" (layers 0:8, int8, token auth) and node "public" (layers
0:8, no quantization, open). The ledger test adds its own node under another DHT prefix and kills it.
"""

import importlib.util
import json
import os
import sqlite3
import subprocess
import time
from dataclasses import dataclass

import pytest
import torch

from farmesh_core.architecture import adapter_for
from farmesh_core.checkpoint import Checkpoint
from farmesh_core.client import DistributedInferenceClient
from farmesh_core.client.mesh import connect
from farmesh_core.config import ClientConfig
from farmesh_core.dht import fetch_node_records, start_dht
from farmesh_core.errors import NoRouteError, RequestError
from farmesh_core.launch import (
    farmesh_command,
    kill_process_group,
    node_peer_id,
    stop_process,
    wait_for_layers,
)
from farmesh_core.node.layer_span import LayerSpan
from farmesh_plugins.auth import create_key_file, issue_token, read_key_file, revoke
from farmesh_plugins.ledgers import usage_totals
from tests.helpers import NUM_LAYERS, PROMPT
from tests.preloaded import Process, spawn_dht, spawn_node

pytestmark = pytest.mark.timeout(300)


@dataclass
class PrivateMesh:
    model_dir: str
    addrs: list[str]
    key_file: str
    revoked_file: str
    private: str  # peer id of the int8, token-auth node
    public: str  # peer id of the plain, open node
    procs: dict[str, Process]

    def token(self, client: str, expires_in: float = 3600, **kwargs) -> str:
        return issue_token(read_key_file(self.key_file), client, expires_in, **kwargs)

    def assert_alive(self) -> None:
        for name, proc in self.procs.items():
            assert proc.poll() is None, f"the {name} process died (exit code {proc.returncode})"


@pytest.fixture(scope="module")
def mesh(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("private-mesh")
    key_file, revoked_file = str(tmp / "mesh.key"), str(tmp / "revoked.txt")
    create_key_file(key_file)
    open(revoked_file, "w").close()
    dht, addrs = spawn_dht()
    procs = {"dht": dht}
    try:
        common = ("--layers", f"0:{NUM_LAYERS}", "--num-threads", "1")
        private_args = ("--quantization", "int8", "--auth", "token", "--auth-key-file", key_file,
                        "--auth-revoked-file", revoked_file)  # fmt: skip
        logs = {"private": str(tmp / "private.log"), "public": str(tmp / "public.log")}
        procs["private"] = spawn_node(tiny_llama, addrs, *common, *private_args, log_path=logs["private"])
        procs["public"] = spawn_node(tiny_llama, addrs, *common, log_path=logs["public"])
        wait_for_layers(tiny_llama, addrs, num_nodes=2, procs=[procs["private"], procs["public"]])
        peers = {name: node_peer_id(log) for name, log in logs.items()}
        yield PrivateMesh(tiny_llama, addrs, key_file, revoked_file, peers["private"], peers["public"], procs)
    finally:
        for proc in reversed(procs.values()):
            stop_process(proc)


def client_for(mesh: PrivateMesh, **options) -> DistributedInferenceClient:
    return DistributedInferenceClient(mesh.model_dir, mesh.addrs, **options)


# ---- quantization in the DHT and in routing -------------------------------------------------------
def test_nodes_announce_their_quantization(mesh):
    dht = start_dht(ClientConfig(model_id=mesh.model_dir, dht_bootstrap=mesh.addrs), client_mode=True)
    try:
        records = fetch_node_records(dht, Checkpoint(mesh.model_dir).dht_prefix)
    finally:
        dht.shutdown()
    assert {r.peer_id: r.quantization for r in records} == {mesh.private: "int8", mesh.public: "none"}


def test_a_client_requiring_a_quantization_routes_only_to_nodes_announcing_it(mesh):
    """With the random policy both nodes are candidates for every route; the requirement filters them."""
    for quantization, expected in (
        (None, {mesh.private, mesh.public}),
        ("int8", {mesh.private}),
        ("none", {mesh.public}),
    ):
        _, _, connection = connect(
            ClientConfig(model_id=mesh.model_dir, dht_bootstrap=mesh.addrs, routing="random", quantization=quantization)
        )
        try:
            assert {hop.peer_id for _ in range(24) for hop in connection.route(0, NUM_LAYERS)} == expected
        finally:
            connection.close()


def test_no_node_with_the_required_quantization_is_a_clear_error(mesh):
    _, _, connection = connect(ClientConfig(model_id=mesh.model_dir, dht_bootstrap=mesh.addrs, quantization="nf4"))
    try:
        with pytest.raises(NoRouteError, match="only nodes with quantization='nf4' count"):
            connection.route(0, NUM_LAYERS)
    finally:
        connection.close()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_a_node_asked_for_nf4_without_bitsandbytes_says_what_to_install(mesh):
    result = subprocess.run(
        farmesh_command("node", mesh.model_dir, "--dht-bootstrap", *mesh.addrs, "--layers", "0:1", "--quantization", "nf4"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "pip install farmesh[bnb]" in result.stderr and "Traceback" not in result.stderr


# ---- tokens ---------------------------------------------------------------------------------------
def test_a_token_holder_generates_and_trains_through_the_private_int8_node(mesh):
    """Inference sessions, forward and backward calls all carry the token; int8 gradients come back."""
    with client_for(mesh, quantization="int8", auth="token", auth_token=mesh.token("alice")) as client:
        assert client.layers.mesh.route(0, NUM_LAYERS)[0].peer_id == mesh.private
        input_ids = client.tokenizer(PROMPT, return_tensors="pt").input_ids
        assert len(list(client.generate_ids(input_ids, 8, min_new_tokens=8))) == 8
        # The token must not cross the (unencrypted) direct lane unless the client asks for it.
        assert client.mesh.direct_lane(mesh.private) is None

        hidden = torch.randn(1, 5, 256, generator=torch.Generator().manual_seed(0), requires_grad=True)
        grad_output = torch.randn(1, 5, 256, generator=torch.Generator().manual_seed(1))
        client.layers(hidden).backward(grad_output)

    checkpoint = Checkpoint(mesh.model_dir)
    fp32 = LayerSpan(checkpoint, adapter_for(checkpoint.config), 0, NUM_LAYERS, torch.float32, "cpu")
    expected = fp32.backward(hidden.detach(), grad_output, 0, NUM_LAYERS)
    assert torch.cosine_similarity(hidden.grad.flatten(), expected.flatten(), dim=0) > 0.9


@pytest.mark.parametrize(
    ("case", "refusal"),
    [
        ("missing", "this mesh is private: send an auth token"),
        ("expired", "auth token of client 'bob' expired at"),
        ("forged", "signature does not match this mesh's key"),
        ("revoked", "of client 'carol' has been revoked"),
    ],
)
def test_the_private_node_refuses_bad_tokens_with_a_clear_error(mesh, tmp_path, case, refusal):
    options = {"auth": "token"}
    if case == "missing":
        options = {"auth": "open"}
    elif case == "expired":
        options["auth_token"] = mesh.token("bob", 60, now=time.time() - 3600)
    elif case == "forged":
        create_key_file(str(tmp_path / "other.key"))
        options["auth_token"] = issue_token(read_key_file(str(tmp_path / "other.key")), "mallory", 3600)
    else:
        options["auth_token"] = mesh.token("carol")
        revoke(mesh.revoked_file, options["auth_token"])
    with client_for(mesh, quantization="int8", **options) as client:
        with pytest.raises(RequestError, match=refusal):
            client.generate(PROMPT, max_tokens=2)
    mesh.assert_alive()


def test_a_token_holder_may_choose_the_direct_lane(mesh):
    with client_for(mesh, quantization="int8", auth="token", auth_token=mesh.token("dave"), direct_lane=True) as client:
        input_ids = client.tokenizer(PROMPT, return_tensors="pt").input_ids
        assert len(list(client.generate_ids(input_ids, 4, min_new_tokens=4))) == 4
        assert client.mesh.direct_lane(mesh.private) is not None


def test_forward_calls_without_a_token_are_refused_with_a_clear_error(mesh):
    with client_for(mesh, quantization="int8", auth="open", max_retries=0) as client:
        with pytest.raises(RequestError, match="this mesh is private: send an auth token"):
            client.layers(torch.zeros(1, 2, 256))


def test_generate_cli_with_a_token_from_the_environment(mesh):
    """``FARMESH_TOKEN=... farmesh generate ... --auth token --quantization int8``; without the token
    the command fails with exit code 1 and the node's reason, not a traceback."""
    args = farmesh_command(
        "generate", mesh.model_dir, PROMPT, "--dht-bootstrap", *mesh.addrs, "--max-tokens", "4",
        "--quantization", "int8", "--auth", "token",
    )  # fmt: skip
    env = {**os.environ, "FARMESH_TOKEN": mesh.token("dave")}
    result = subprocess.run(args, capture_output=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    assert result.stdout.strip()

    args[args.index("--auth") + 1] = "open"
    result = subprocess.run(args, capture_output=True, timeout=120)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1 and "this mesh is private" in stderr and "Traceback" not in stderr


# ---- the sqlite ledger ----------------------------------------------------------------------------
def test_sqlite_ledger_keeps_usage_through_sigkill(mesh, tmp_path):
    """A node with ``--ledger sqlite`` serves a generation and is SIGKILLed 1.5 s later: its database
    holds the session's prefill and decode tokens, under the token's client and the caller's peer id."""
    db, log = str(tmp_path / "usage.db"), str(tmp_path / "ledger-node.log")
    node = spawn_node(
        mesh.model_dir, mesh.addrs, "--layers", f"0:{NUM_LAYERS}", "--num-threads", "1", "--dht-prefix", "ledger-kill",
        "--auth", "token", "--auth-key-file", mesh.key_file, "--ledger", "sqlite", "--ledger-path", db, log_path=log,
    )  # fmt: skip
    try:
        node_peer_id(log)
        client = client_for(mesh, dht_prefix="ledger-kill", auth="token", auth_token=mesh.token("erin"))
        try:
            input_ids = client.tokenizer(PROMPT, return_tensors="pt").input_ids
            new_tokens = len(list(client.generate_ids(input_ids, 24, min_new_tokens=24)))
            client_peer = str(client.mesh.dht.peer_id)
        finally:
            client.close()
        time.sleep(1.5)
        kill_process_group(node)
    finally:
        stop_process(node)

    (totals,) = usage_totals(db)
    assert totals["client"] == "erin" and totals["sessions"] == 1 and totals["peers"] == 1
    # the prompt is one multi-token step; every new token but the last goes back through the layers
    assert (totals["prefill_tokens"], totals["decode_tokens"]) == (input_ids.shape[1], new_tokens - 1)
    assert totals["compute_s"] > 0
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT DISTINCT peer FROM usage").fetchall() == [(client_peer,)]

    result = subprocess.run(farmesh_command("usage", "--db", db, "--json"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)[0]["decode_tokens"] == new_tokens - 1
