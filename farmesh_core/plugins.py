"""Load FarMesh plugins: the built-ins, then every entry point of the group ``farmesh``.

Set ``FARMESH_PLUGINS`` to a comma-separated list of entry-point names to load only those external
plugins (an empty value loads none); the built-ins in :mod:`farmesh_plugins` always load.
"""

import importlib
import logging
import os
from collections.abc import Callable
from typing import Any

import pluggy
from importlib_metadata import entry_points

from farmesh_core import hookspecs
from farmesh_core.errors import PluginNotFoundError

logger = logging.getLogger(__name__)

BUILTIN_PLUGINS = (
    "farmesh_plugins.routing",
    "farmesh_plugins.quantization",
    "farmesh_plugins.auth",
    "farmesh_plugins.ledgers",
)

pm = pluggy.PluginManager("farmesh")
pm.add_hookspecs(hookspecs)
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register built-in and external plugins once per process; return the plugin manager."""
    global _loaded
    if _loaded:
        return pm
    _loaded = True
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    allowed = os.environ.get("FARMESH_PLUGINS")
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for entry_point in entry_points(group="farmesh"):
        if allowed_names is not None and entry_point.name not in allowed_names:
            continue
        if pm.get_plugin(entry_point.name) is not None:
            continue
        try:
            pm.register(entry_point.load(), name=entry_point.name)
        except Exception:
            logger.exception("Could not load the FarMesh plugin %r (%s)", entry_point.name, entry_point.value)
    return pm


def _collect(hook_name: str) -> dict[str, Any]:
    registered: dict[str, Any] = {}

    def register(name: str, thing: Any) -> None:
        registered[name] = thing

    getattr(load_plugins().hook, hook_name)(register=register)
    return registered


def get_architectures() -> dict[str, Any]:
    """Architecture adapters by Hugging Face ``model_type``."""
    adapters: dict[str, Any] = {}
    load_plugins().hook.farmesh_register_architectures(register=lambda a: adapters.__setitem__(a.model_type, a))
    return adapters


def get_quantizers() -> dict[str, Callable]:
    return _collect("farmesh_register_quantizers")


def get_routing_policies() -> dict[str, Callable]:
    return _collect("farmesh_register_routing_policies")


def get_auth_providers() -> dict[str, Any]:
    return _collect("farmesh_register_auth_providers")


def get_payment_ledgers() -> dict[str, Any]:
    return _collect("farmesh_register_payment_ledgers")


def pick(kind: str, registry: dict[str, Any], name: str) -> Any:
    """Return ``registry[name]`` or a clear error listing what is installed."""
    try:
        return registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise PluginNotFoundError(f"No {kind} named {name!r} is installed (installed: {known})") from None
