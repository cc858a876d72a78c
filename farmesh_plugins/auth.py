"""Built-in auth providers: ``open`` (anyone may call) and ``token`` (a private mesh).

In a private mesh the operator holds a secret key and gives it to the nodes (``--auth-key-file``).
With it, ``farmesh token issue`` signs tokens for clients: ``fm1.<payload>.<signature>``, where the
payload is base64url JSON naming the client, the expiry (Unix seconds) and a random token id, and
the signature is HMAC-SHA256 of ``fm1.<payload>`` under the key. HMAC keeps it simple and robust: one
shared secret, no key pairs, and verifying costs microseconds. Nodes refuse missing, malformed,
forged, expired and revoked tokens; revoked token ids are listed one per line in a file
(``--auth-revoked-file``) that the node re-reads whenever it changes.

libp2p authenticates peer ids already, so the node knows who called: the peer id (recorded by the
node with each usage event) and, with tokens, the client name the operator put in the token.
"""

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import time

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from farmesh_core.errors import ConfigError, RequestError
from farmesh_core.hookspecs import hookimpl

logger = logging.getLogger(__name__)

TOKEN_VERSION = "fm1"
TOKEN_ENV = "FARMESH_TOKEN"
MAX_TOKEN_CHARS = 2048
MIN_KEY_CHARS = 32
CLIENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$"
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenClaims(BaseModel):
    """What a token says: who it was issued to, until when, and its id (what revocation lists)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    client: str = Field(pattern=CLIENT_NAME_PATTERN)
    exp: int = Field(gt=0, description="expiry, Unix seconds")
    id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    iat: int = Field(ge=0, description="issued at, Unix seconds")


# ---- keys, durations, tokens -------------------------------------------------------------------------
def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def create_key_file(path: str) -> None:
    """Write a new random key (64 hex characters) to ``path``, readable by its owner only; never overwrite."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists already; keep it, or remove it first to make a new key") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


def read_key_file(path: str | None) -> bytes:
    """The secret in ``path`` (surrounding whitespace stripped), with clear errors when it is unusable."""
    if not path:
        raise ConfigError(
            "auth 'token' needs the mesh key: pass --auth-key-file PATH (make one with `farmesh token keygen`)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except OSError as e:
        raise ConfigError(
            f"cannot read the auth key file {path}: {e.strerror}; make one with `farmesh token keygen`"
        ) from None
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(f"the auth key in {path} is too short ({len(key)} characters, need {MIN_KEY_CHARS})")
    return key.encode()


def parse_duration(text: str) -> float:
    """Seconds in ``"30d"``, ``"12h"``, ``"45m"``, ``"90s"``, ``"2w"`` or a plain number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"cannot read the duration {text!r}; use for example 30d, 12h, 45m or 3600")
    return float(match.group(1)) * DURATION_UNITS.get(match.group(2) or "s", 1)


def issue_token(key: bytes, client: str, expires_in: float, now: float | None = None) -> str:
    """A token for ``client`` valid for ``expires_in`` seconds, signed with ``key``."""
    now = time.time() if now is None else now
    try:
        claims = TokenClaims(client=client, exp=int(now + expires_in), id=secrets.token_hex(8), iat=int(now))
    except ValidationError:
        raise ConfigError(
            f"client name {client!r} is not allowed: use 1-64 letters, digits and _.@+- (starting with a letter or digit)"
        ) from None
    payload = _b64encode(claims.model_dump_json().encode())
    return f"{TOKEN_VERSION}.{payload}.{_sign(key, payload)}"


def _sign(key: bytes, payload: str) -> str:
    return _b64encode(hmac.new(key, f"{TOKEN_VERSION}.{payload}".encode(), hashlib.sha256).digest())


def _split(token: str) -> tuple[str, str]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise RequestError("the auth token is malformed (too long)")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_VERSION:
        raise RequestError(f"the auth token is malformed (expected {TOKEN_VERSION}.<payload>.<signature>)")
    return parts[1], parts[2]


def _claims(payload: str) -> TokenClaims:
    try:
        return TokenClaims.model_validate_json(_b64decode(payload))
    except (ValidationError, binascii.Error, ValueError):
        raise RequestError("the auth token is malformed (unreadable payload)") from None


def read_claims_unverified(token: str) -> TokenClaims:
    """The claims of ``token`` without checking its signature (to find a token's id, or fail early on a typo)."""
    payload, _ = _split(token)
    return _claims(payload)


def verify_token(token: str, key: bytes, now: float | None = None) -> TokenClaims:
    """The claims of ``token`` if ``key`` signed it and it has not expired; RequestError otherwise."""
    payload, signature = _split(token)
    if not hmac.compare_digest(signature.encode(), _sign(key, payload).encode()):
        raise RequestError(
            "the auth token is invalid: its signature does not match this mesh's key (forged or for another mesh)"
        )
    claims = _claims(payload)
    now = time.time() if now is None else now
    if claims.exp <= now:
        expired = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(claims.exp))
        raise RequestError(
            f"the auth token of client {claims.client!r} expired at {expired}; ask the mesh operator for a new one"
        )
    return claims


class RevocationList:
    """Token ids listed in a file (one per line, ``#`` comments), re-read whenever the file changes."""

    def __init__(self, path: str | None):
        self.path = path
        self._ids: frozenset[str] = frozenset()
        self._stamp: tuple | None = None

    def __contains__(self, token_id: str) -> bool:
        self._refresh()
        return token_id in self._ids

    def _refresh(self) -> None:
        if not self.path:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._ids, self._stamp = frozenset(), None
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:  # keep the previous list rather than let revoked tokens in
            logger.warning("Cannot read the revocation list %s: %s", self.path, e)
            return
        self._ids = frozenset(line.split("#", 1)[0].strip() for line in lines) - {""}
        self._stamp = stamp
        logger.info("Revocation list %s: %d revoked token(s)", self.path, len(self._ids))


def revoke(path: str, token_or_id: str) -> str:
    """Append the id of a token (or a bare token id) to the revocation list at ``path``; return the id."""
    token_id = token_or_id.strip()
    if token_id.startswith(f"{TOKEN_VERSION}."):
        try:
            claims = read_claims_unverified(token_id)
        except RequestError as e:
            raise ConfigError(str(e)) from None
        token_id = claims.id
    if not re.fullmatch(r"[0-9a-f]{16,64}", token_id):
        raise ConfigError(f"{token_or_id!r} is neither a token nor a token id")
    with open(path, "a", encoding="utf-8") as f:
        f.write(token_id + "\n")
    return token_id


# ---- providers -----------------------------------------------------------------------------------------
class OpenAuth:
    """An open mesh: no credentials, everyone is allowed; the caller is known by its peer id."""

    def credentials(self) -> dict[str, str]:
        return {}

    def verify(self, credentials: dict[str, str], peer_id: str) -> str:
        return peer_id


class TokenAuth:
    """A private mesh. Client side it sends its token; node side it verifies tokens with the mesh key."""

    def __init__(self, key: bytes | None = None, token: str | None = None, revoked_file: str | None = None):
        self.key, self.token = key, token
        self.revoked = RevocationList(revoked_file)

    def credentials(self) -> dict[str, str]:
        return {"token": self.token} if self.token else {}

    def verify(self, credentials: dict[str, str], peer_id: str) -> str:
        if self.key is None:
            raise RequestError("this node has no auth key configured")
        token = credentials.get("token")
        if not token:
            raise RequestError(
                "this mesh is private: send an auth token (auth='token' with auth_token=... or the "
                f"{TOKEN_ENV} environment variable; the mesh operator issues them with `farmesh token issue`)"
            )
        claims = verify_token(token, self.key)
        if claims.id in self.revoked:
            raise RequestError(f"the auth token {claims.id} of client {claims.client!r} has been revoked")
        return claims.client


def open_auth(config) -> OpenAuth:
    return OpenAuth()


def token_auth(config) -> TokenAuth:
    """Node side (a NodeConfig): the key and revocation list; client side (a ClientConfig): the token."""
    from farmesh_core.config import NodeConfig

    if isinstance(config, NodeConfig):
        return TokenAuth(key=read_key_file(config.auth_key_file), revoked_file=config.auth_revoked_file)
    secret = getattr(config, "auth_token", None)
    token = secret.get_secret_value() if secret is not None else os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"auth 'token' needs a token: pass auth_token=... or set {TOKEN_ENV}")
    try:
        read_claims_unverified(token)  # a typo fails here, not as a refusal from every node
    except RequestError as e:
        raise ConfigError(str(e)) from None
    return TokenAuth(token=token)


@hookimpl
def farmesh_register_auth_providers(register):
    register("open", open_auth)
    register("token", token_auth)
