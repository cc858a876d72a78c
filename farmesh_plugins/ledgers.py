"""Built-in payment ledgers."""

from farmesh_core.extensions import UsageEvent
from farmesh_core.hookspecs import hookimpl


class NullLedger:
    """Records nothing: for meshes that do not account for usage."""

    def record(self, event: UsageEvent) -> None:
        return None


@hookimpl
def farmesh_register_payment_ledgers(register):
    register("null", NullLedger())
