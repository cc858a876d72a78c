"""The plugin core: built-ins always load, adapters and third-party plugins come in through the
entry-point group ``farmesh``, and ``FARMESH_PLUGINS`` restricts which external plugins load."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from importlib_metadata import entry_points

from farmesh_core.errors import PluginNotFoundError
from farmesh_core.plugins import (
    get_architectures,
    get_auth_providers,
    get_payment_ledgers,
    get_quantizers,
    get_routing_policies,
    pick,
)

# ---- what a plain install provides ---------------------------------------------------------------


def test_builtin_routing_policy():
    assert "fewest-hops" in get_routing_policies()


def test_builtin_quantizer():
    assert "none" in get_quantizers()


def test_builtin_auth_provider():
    assert "open" in get_auth_providers()


def test_builtin_payment_ledger():
    assert "null" in get_payment_ledgers()


def test_llama_adapter_comes_from_its_own_distribution():
    """ "llama" is registered by the farmesh-llama package through its entry point, not by the core."""
    names = {ep.name: ep.value for ep in entry_points(group="farmesh")}
    assert names.get("llama") == "farmesh_llama"
    adapter = get_architectures()["llama"]
    assert type(adapter).__module__.startswith("farmesh_llama")
    assert adapter.model_type == "llama"


def test_pick_names_the_installed_choices():
    """Asking for a plugin that is not installed lists what is."""
    with pytest.raises(PluginNotFoundError) as error:
        pick("routing policy", get_routing_policies(), "teleport")
    message = str(error.value)
    assert "No routing policy named 'teleport' is installed" in message
    assert "fewest-hops" in message


def test_pick_returns_the_registered_thing():
    assert pick("routing policy", get_routing_policies(), "fewest-hops") is get_routing_policies()["fewest-hops"]


# ---- a throwaway third-party plugin --------------------------------------------------------------
PLUGIN_MODULE = '''
"""A third-party FarMesh plugin: a routing policy that always uses the first node that fits."""

from farmesh_core.errors import NoRouteError
from farmesh_core.extensions import RouteHop
from farmesh_core.hookspecs import hookimpl


def always_first(request):
    hops, position = [], request.start
    while position < request.end:
        found = [r for r in request.records if r.start <= position < r.end]
        if not found:
            raise NoRouteError.for_layers(position, request.end, request.records)
        end = min(found[0].end, request.end)
        hops.append(RouteHop(peer_id=found[0].peer_id, start=position, end=end))
        position = end
    return hops


@hookimpl
def farmesh_register_routing_policies(register):
    register("always-first", always_first)
'''

PROBE = """
import json
from farmesh_core.config import NodeRecord
from farmesh_core.extensions import RouteRequest
from farmesh_core.plugins import get_architectures, get_routing_policies

policies = get_routing_policies()
result = {"policies": sorted(policies), "architectures": sorted(get_architectures())}
if "always-first" in policies:
    records = [NodeRecord(peer_id=p, start=s, end=e, throughput=1, cache_tokens_left=1)
               for p, s, e in [("A", 0, 3), ("B", 0, 8), ("C", 3, 8)]]
    hops = policies["always-first"](RouteRequest(records=records, start=0, end=8))
    result["route"] = [[h.peer_id, h.start, h.end] for h in hops]
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """``myplugin`` installed into a directory as a distribution with an entry point in group farmesh,
    and a broken plugin whose import fails."""
    root = tmp_path_factory.mktemp("site")
    (root / "myplugin.py").write_text(PLUGIN_MODULE)
    (root / "broken_plugin.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    for name, module in (("myplugin", "myplugin"), ("broken-plugin", "broken_plugin")):
        info = root / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[farmesh]\n{module} = {module}\n")
    return root


ENVIRONMENTS = {"unset": None, "other": "other", "myplugin": "myplugin", "empty": ""}


@pytest.fixture(scope="module")
def probes(plugin_dir) -> dict[str, dict]:
    """Fresh Pythons with ``plugin_dir`` on their path, one per FARMESH_PLUGINS value (run side by
    side); what each saw, by the names of ENVIRONMENTS."""
    running = {}
    for name, value in ENVIRONMENTS.items():
        env = {k: v for k, v in os.environ.items() if k not in ("FARMESH_PLUGINS", "PYTHONPATH")}
        env["PYTHONPATH"] = str(plugin_dir)
        if value is not None:
            env["FARMESH_PLUGINS"] = value
        running[name] = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(PROBE)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    seen = {}
    try:
        for name, proc in running.items():
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, f"FARMESH_PLUGINS={ENVIRONMENTS[name]!r}: {err[-3000:]}"
            seen[name] = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return seen


def test_third_party_routing_policy_is_picked_up(probes):
    """An installed package declaring ``[farmesh] myplugin = myplugin`` adds its routing policy, and the
    policy works on node records."""
    seen = probes["unset"]
    assert "always-first" in seen["policies"]
    assert "fewest-hops" in seen["policies"]
    assert seen["route"] == [["A", 0, 3], ["B", 3, 8]]  # fewest-hops would take B for all


def test_a_broken_plugin_does_not_break_the_others(probes):
    """A plugin whose import fails is skipped (and logged); built-ins, adapters and other plugins load."""
    seen = probes["unset"]
    assert "always-first" in seen["policies"] and "fewest-hops" in seen["policies"]
    assert "llama" in seen["architectures"]


def test_farmesh_plugins_env_excludes_unlisted_plugins(probes):
    """``FARMESH_PLUGINS=other`` loads no external plugin but the named ones; built-ins still load."""
    seen = probes["other"]
    assert "always-first" not in seen["policies"]
    assert "fewest-hops" in seen["policies"]
    assert "llama" not in seen["architectures"]


def test_farmesh_plugins_env_includes_listed_plugins(probes):
    """``FARMESH_PLUGINS=myplugin`` loads that plugin and no other external one."""
    seen = probes["myplugin"]
    assert "always-first" in seen["policies"]
    assert "llama" not in seen["architectures"]


def test_empty_farmesh_plugins_loads_only_builtins(probes):
    """An empty ``FARMESH_PLUGINS`` loads no external plugin at all."""
    seen = probes["empty"]
    assert "always-first" not in seen["policies"]
    assert seen["architectures"] == []
    assert "fewest-hops" in seen["policies"]
