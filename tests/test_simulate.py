"""The routing simulator: what it reports, that it is reproducible, and that it tells policies apart."""

import json
import os
import subprocess
import sys

import pytest

from farmesh_core.errors import PluginNotFoundError
from farmesh_core.simulate import SimulationConfig, SimulationError, plot_results, run_simulation

POLICIES = ("fewest-hops", "max-throughput", "min-latency", "random")
TIMINGS = ("wall_seconds", "cpu_seconds", "policy_seconds")  # the only fields that may differ between runs
SMALL = dict(nodes=60, layers=24, min_span=3, max_span=10, requests=300, clients=10)


def simulate(**options) -> dict:
    return run_simulation(SimulationConfig(**{**SMALL, **options}))


def without_timings(result: dict) -> dict:
    return {name: {k: v for k, v in stats.items() if k not in TIMINGS} for name, stats in result["policies"].items()}


def test_every_registered_policy_gets_every_metric():
    result = simulate()
    assert set(POLICIES) <= set(result["policies"])
    for stats in result["policies"].values():
        assert 0 < stats["latency_per_token_mean_s"] and 0 < stats["latency_per_token_p95_s"]
        assert stats["throughput_tokens_per_s"] > 0
        assert stats["load_balance"]["tokens_served_cv"] >= 0
        assert stats["load_balance"]["tokens_served_max_over_mean"] >= 1
        assert stats["completed_requests"] + stats["failed_requests"] == SMALL["requests"]
        assert stats["wall_seconds"] > 0 and stats["policy_seconds"] > 0
    assert result["config"]["nodes"] == SMALL["nodes"]


def test_same_seed_gives_the_same_result_and_another_seed_another():
    assert without_timings(simulate(seed=7)) == without_timings(simulate(seed=7))
    assert without_timings(simulate(seed=7)) != without_timings(simulate(seed=8))


def test_min_latency_avoids_far_nodes_that_random_walks_into():
    result = simulate(far_fraction=0.3, far_rtt=2.0, failure_rate=0, arrival_rate=1.0, policies="min-latency,random")
    stats = result["policies"]
    assert stats["min-latency"]["latency_per_token_mean_s"] < 0.5 * stats["random"]["latency_per_token_mean_s"]


def test_max_throughput_spreads_load_that_fewest_hops_piles_on_a_few_nodes():
    result = simulate(failure_rate=0, policies="max-throughput,fewest-hops")
    spread, piled = result["policies"]["max-throughput"], result["policies"]["fewest-hops"]
    assert spread["load_balance"]["tokens_served_cv"] < piled["load_balance"]["tokens_served_cv"]
    assert spread["load_balance"]["tokens_served_max_over_mean"] < piled["load_balance"]["tokens_served_max_over_mean"]
    assert spread["load_balance"]["peak_node_load"] < piled["load_balance"]["peak_node_load"]


def test_dying_nodes_fail_requests_and_a_retry_on_another_chain_rescues_some():
    no_retry = simulate(failure_rate=3, policies="random")["policies"]["random"]
    one_retry = simulate(failure_rate=3, retries=1, policies="random")["policies"]["random"]
    assert no_retry["failed_requests"] > 0 and no_retry["node_failures"] > 0
    assert one_retry["retried_requests"] > 0
    assert one_retry["failed_requests"] < no_retry["failed_requests"]


def test_a_policy_returning_a_broken_chain_is_named():
    config = SimulationConfig(**SMALL)
    with pytest.raises(SimulationError, match="'half'"):
        run_simulation(config, policies={"half": lambda request: []})


def test_an_unknown_policy_lists_the_installed_ones():
    with pytest.raises(PluginNotFoundError, match="min-latency"):
        simulate(policies="fastest")


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(SimulationError, match="pip install matplotlib"):
        plot_results(simulate(requests=20, policies="random"), str(tmp_path / "out.png"))


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "out.png"
    plot_results(simulate(requests=50), str(path))
    assert path.read_bytes().startswith(b"\x89PNG")


def test_command_line_options_override_the_config_file(tmp_path, capsys):
    from farmesh_core.cli import build_parser
    from farmesh_core.simulate import simulate_command

    config = tmp_path / "sim.json"
    config.write_text(json.dumps({**SMALL, "requests": 40, "far_rtt": 1.5}))
    simulate_command(build_parser().parse_args(["simulate", "--config", str(config), "--requests", "30"]))
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["requests"] == 30 and result["config"]["far_rtt"] == 1.5


def test_the_cli_prints_json():
    done = subprocess.run(
        [sys.executable, "-m", "farmesh_core.cli", "simulate", "--nodes", "50", "--requests", "200"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "FARMESH_PLUGINS": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["config"]["nodes"] == 50 and result["config"]["requests"] == 200
    assert set(POLICIES) <= set(result["policies"])


def test_the_cli_rejects_bad_options_with_the_option_name():
    done = subprocess.run(
        [sys.executable, "-m", "farmesh_core.simulate", "--nodes", "0"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "--nodes" in done.stderr and "Traceback" not in done.stderr
