"""Built-in auth providers."""

from farmesh_core.hookspecs import hookimpl


class OpenAuth:
    """An open mesh: no credentials, everyone is allowed; the caller is known by its peer id."""

    def credentials(self) -> dict[str, str]:
        return {}

    def verify(self, credentials: dict[str, str], peer_id: str) -> str:
        return peer_id


@hookimpl
def farmesh_register_auth_providers(register):
    register("open", OpenAuth())
