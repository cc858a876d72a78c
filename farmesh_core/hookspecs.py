"""Every FarMesh extension point, in one place.

A plugin is a module with functions named like the hooks below, decorated with ``@hookimpl``.
Each ``farmesh_register_*`` hook receives a ``register`` callable; call it once per thing you add.
Configuration then picks one registered thing by name (``quantization="int8"``,
``routing="fewest-hops"``...). Third-party packages declare their module under the entry-point
group ``farmesh`` and are loaded by :mod:`farmesh_core.plugins`.
"""

import pluggy

hookspec = pluggy.HookspecMarker("farmesh")
hookimpl = pluggy.HookimplMarker("farmesh")


@hookspec
def farmesh_register_architectures(register):
    """Register architecture adapters.

    Called once when the plugins load. Call ``register(adapter)`` with an
    :class:`~farmesh_core.architecture.ArchitectureAdapter` per Hugging Face ``model_type`` you
    support. The node uses it to build, load and run layers; the client to build the embeddings,
    final norm and LM head. A later registration for the same ``model_type`` replaces an earlier one.
    """


@hookspec
def farmesh_register_quantizers(register):
    """Register quantizers.

    Call ``register(name, quantizer)`` where ``quantizer(layer, config) -> nn.Module`` returns the
    layer to serve (it may change ``layer`` in place and return it). The node applies the quantizer
    named by ``NodeConfig.quantization`` to each layer after its weights are loaded, and announces
    that name in its DHT record; clients may require it (``ClientConfig.quantization``). The layer
    returned must run under ``torch.inference_mode`` and pass gradients to its input (backward).
    Raise :class:`~farmesh_core.errors.ConfigError` when it cannot be done here (a missing library,
    an unsupported dtype or device): the node then stops with that message.
    """


@hookspec
def farmesh_register_routing_policies(register):
    """Register routing policies.

    Call ``register(name, policy)``. ``policy(request: RouteRequest) -> list[RouteHop]`` gets the
    online node records, measured latencies (seconds, by peer id, may be empty), the layer range
    to cover and the peers to avoid, and returns a chain of hops that covers the range exactly, in
    order. Raise :class:`~farmesh_core.errors.NoRouteError` when no chain exists.
    """


@hookspec
def farmesh_register_auth_providers(register):
    """Register auth providers.

    Call ``register(name, factory)``; ``factory(config)`` returns an
    :class:`~farmesh_core.extensions.AuthProvider` configured from the
    :class:`~farmesh_core.config.NodeConfig` (node side) or :class:`~farmesh_core.config.ClientConfig`
    (client side), or raises :class:`~farmesh_core.errors.ConfigError` naming what is missing. It is
    called once when a node starts or a client connects. Client side, ``provider.credentials()``
    returns a dict of strings attached to every request. Node side, ``provider.verify(credentials,
    peer_id)`` returns the client's name to allow the request, or raises
    :class:`~farmesh_core.errors.RequestError` with the reason to refuse it.
    """


@hookspec
def farmesh_register_payment_ledgers(register):
    """Register payment ledgers.

    Call ``register(name, factory)``; ``factory(config)`` gets the node's
    :class:`~farmesh_core.config.NodeConfig` when the node starts and returns a
    :class:`~farmesh_core.extensions.PaymentLedger`. The node calls ``ledger.record(event)`` with a
    :class:`~farmesh_core.extensions.UsageEvent` after every step it serves (node, client, peer,
    session, layers, prefill and decode tokens, compute time), and ``ledger.close()``, if it has one,
    when it stops. ``record`` must be quick and must not raise.
    """


@hookspec
def farmesh_prepare_layer(layer, index, config):
    """Change a loaded layer in place before it is served (for example, inject LoRA weights).

    Called by the node for every layer it serves, after loading and before quantization, with the
    ``nn.Module``, its global layer ``index`` and the :class:`~farmesh_core.config.NodeConfig`.
    The return value is ignored.
    """
