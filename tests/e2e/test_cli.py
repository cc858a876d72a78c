"""The ``farmesh`` command line, end to end: ``farmesh generate`` and ``farmesh status`` as
subprocesses, against the shared mesh of ``farmesh dht`` and two ``farmesh node`` processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from farmesh_core.cli import build_parser
from farmesh_core.launch import farmesh_command
from tests.helpers import NUM_LAYERS, PROMPT, hf_greedy_text

FARMESH = str(Path(sys.executable).with_name("farmesh"))  # the console script of the installed package


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m farmesh_core.cli ARGS``; stdout and stderr as bytes (the text is not all ASCII)."""
    return subprocess.run(farmesh_command(*args), capture_output=True, timeout=timeout)


def subcommands() -> list[str]:
    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return sorted(action.choices)


@pytest.mark.timeout(180)
def test_generate_prints_the_greedy_text(llama_mesh):
    """``farmesh generate MODEL PROMPT --dht-bootstrap ADDR --max-tokens 32`` prints transformers'
    greedy continuation, then a newline."""
    result = run_cli(
        "generate", llama_mesh.model_dir, PROMPT, "--dht-bootstrap", *llama_mesh.addrs, "--max-tokens", "32"
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    assert result.stdout.decode() == hf_greedy_text(llama_mesh.model_dir, PROMPT, 32) + "\n"


@pytest.mark.timeout(180)
def test_a_piped_generate_leaves_nothing_holding_its_output(llama_mesh):
    """When ``farmesh generate`` exits, no process of its own still holds its stdout or stderr, so a
    pipe reading them ends with it (hivemind's shared-memory manager used to hold stderr ~2 s more)."""
    command = farmesh_command(
        "generate", llama_mesh.model_dir, PROMPT, "--dht-bootstrap", *llama_mesh.addrs, "--max-tokens", "4"
    )
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pipes = {f"pipe:[{os.fstat(f.fileno()).st_ino}]" for f in (proc.stdout, proc.stderr)}
    proc.wait(timeout=120)  # (its few lines of output fit the pipes' buffers)
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if int(pid) != os.getpid() and any(os.readlink(f"/proc/{pid}/fd/{fd}") in pipes for fd in fds):
                holders.append(open(f"/proc/{pid}/cmdline").read().replace("\0", " "))
        except OSError:  # gone meanwhile, or not ours to read
            pass
    _, stderr = proc.communicate()
    assert proc.returncode == 0, stderr.decode(errors="replace")[-3000:]
    assert holders == []


@pytest.mark.timeout(180)
def test_status_json_lists_both_nodes_and_no_gaps(llama_mesh):
    """``farmesh status MODEL --dht-bootstrap ADDR --json`` shows both nodes online and every layer served."""
    result = run_cli("status", llama_mesh.model_dir, "--dht-bootstrap", *llama_mesh.addrs, "--json")
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    status = json.loads(result.stdout)
    assert status["num_layers"] == NUM_LAYERS
    assert sorted((n["start"], n["end"], n["state"]) for n in status["nodes"]) == [
        (0, 4, "online"),
        (4, 8, "online"),
    ]
    assert len({n["peer_id"] for n in status["nodes"]}) == 2
    assert all(n["throughput"] > 0 for n in status["nodes"])
    assert status["missing_layers"] == []
    assert status["nodes_per_layer"] == [1] * NUM_LAYERS


@pytest.mark.timeout(180)
def test_generate_without_nodes_names_the_missing_layers(llama_mesh):
    """Asking a mesh namespace nobody serves fails with exit code 1 and says which node to start."""
    result = run_cli(
        "generate", llama_mesh.model_dir, PROMPT, "--dht-bootstrap", *llama_mesh.addrs,
        "--dht-prefix", "nobody-serves-this", "--max-tokens", "4",
    )  # fmt: skip
    assert result.returncode == 1
    stderr = result.stderr.decode(errors="replace")
    assert "Layers 0-7 have no node" in stderr
    assert "--layers 0:8" in stderr
    assert "Traceback" not in stderr
    assert result.stdout.strip() == b""


@pytest.mark.timeout(60)
def test_farmesh_help_exits_zero():
    """``farmesh --help`` lists every subcommand."""
    result = subprocess.run([FARMESH, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    for name in subcommands():
        assert name in result.stdout


def test_the_documented_subcommands_exist():
    """The issue's commands are all there."""
    assert {"dht", "node", "generate", "status", "demo"} <= set(subcommands())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_has_help(command):
    """``farmesh COMMAND --help`` exits 0 and prints the command's usage."""
    result = subprocess.run([FARMESH, command, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: farmesh {command}")
