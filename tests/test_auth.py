"""Auth providers: ``open`` lets everyone in as their peer id; ``token`` lets in only holders of an
HMAC-signed, unexpired, unrevoked token from the mesh operator, and names the client it was issued to.
(Live nodes refusing tokens: tests/e2e/test_private_mesh.py.)"""

import os
import stat
import time

import pytest

from farmesh_core.cli import main
from farmesh_core.config import ClientConfig, NodeConfig
from farmesh_core.errors import ConfigError, RequestError
from farmesh_core.plugins import get_auth_providers
from farmesh_plugins.auth import (
    TOKEN_ENV,
    create_key_file,
    issue_token,
    parse_duration,
    read_claims_unverified,
    revoke,
    verify_token,
)

PEER = "QmCallerPeerId"


@pytest.fixture
def key_file(tmp_path) -> str:
    path = str(tmp_path / "mesh.key")
    create_key_file(path)
    return path


def node_auth(key_file: str, revoked_file: str | None = None):
    config = NodeConfig(model_id="unused", auth="token", auth_key_file=key_file, auth_revoked_file=revoked_file)
    return get_auth_providers()["token"](config)


def key(key_file: str) -> bytes:
    with open(key_file) as f:
        return f.read().strip().encode()


# ---- open ----------------------------------------------------------------------------------------
def test_open_auth_allows_everyone_as_their_peer_id():
    auth = get_auth_providers()["open"](NodeConfig(model_id="unused"))
    assert auth.credentials() == {}
    assert auth.verify({}, PEER) == PEER


# ---- tokens --------------------------------------------------------------------------------------
def test_a_valid_token_names_its_client(key_file):
    token = issue_token(key(key_file), "alice", 3600)
    assert node_auth(key_file).verify({"token": token}, PEER) == "alice"
    claims = read_claims_unverified(token)
    assert claims.client == "alice" and claims.exp - time.time() == pytest.approx(3600, abs=5)


def test_a_request_without_a_token_is_refused(key_file):
    with pytest.raises(RequestError, match=f"this mesh is private: send an auth token.*{TOKEN_ENV}"):
        node_auth(key_file).verify({}, PEER)


def test_an_expired_token_is_refused(key_file):
    token = issue_token(key(key_file), "alice", 60, now=time.time() - 120)
    with pytest.raises(RequestError, match="auth token of client 'alice' expired at .*ask the mesh operator"):
        node_auth(key_file).verify({"token": token}, PEER)


def test_a_token_signed_with_another_key_is_refused(key_file, tmp_path):
    other = str(tmp_path / "other.key")
    create_key_file(other)
    token = issue_token(key(other), "mallory", 3600)
    with pytest.raises(RequestError, match="signature does not match this mesh's key"):
        node_auth(key_file).verify({"token": token}, PEER)


def test_a_token_with_an_altered_payload_is_refused(key_file):
    """Changing the client name (or the expiry) inside a genuine token breaks its signature."""
    genuine = issue_token(key(key_file), "alice", 3600)
    forged_payload = issue_token(key(key_file), "root", 10**8).split(".")[1]
    version, _, signature = genuine.split(".")
    with pytest.raises(RequestError, match="signature does not match"):
        node_auth(key_file).verify({"token": f"{version}.{forged_payload}.{signature}"}, PEER)


@pytest.mark.parametrize("token", ["garbage", "fm1.x", "fm2.a.b", "fm1..", "fm1.a.b.c", "x" * 5000, "fm1.!!!.???"])
def test_a_malformed_token_is_refused(key_file, token):
    with pytest.raises(RequestError, match="the auth token is (malformed|invalid)"):
        node_auth(key_file).verify({"token": token}, PEER)


def test_revocation_takes_effect_when_the_file_changes(key_file, tmp_path):
    revoked_file = str(tmp_path / "revoked.txt")
    auth = node_auth(key_file, revoked_file)  # the file does not exist yet: nothing is revoked
    token = issue_token(key(key_file), "alice", 3600)
    other = issue_token(key(key_file), "bob", 3600)
    assert auth.verify({"token": token}, PEER) == "alice"

    token_id = revoke(revoked_file, token)
    assert token_id == read_claims_unverified(token).id
    with pytest.raises(RequestError, match=f"auth token {token_id} of client 'alice' has been revoked"):
        auth.verify({"token": token}, PEER)
    assert auth.verify({"token": other}, PEER) == "bob"

    with open(revoked_file, "w") as f:  # the operator takes it back off the list
        f.write("# nothing revoked\n")
    assert auth.verify({"token": token}, PEER) == "alice"


# ---- configuration -------------------------------------------------------------------------------
def test_a_token_node_needs_a_usable_key_file(tmp_path):
    with pytest.raises(ConfigError, match="--auth-key-file"):
        get_auth_providers()["token"](NodeConfig(model_id="unused", auth="token"))
    with pytest.raises(ConfigError, match="cannot read the auth key file"):
        node_auth(str(tmp_path / "missing.key"))
    short = tmp_path / "short.key"
    short.write_text("secret\n")
    with pytest.raises(ConfigError, match="too short"):
        node_auth(str(short))


def test_keygen_writes_a_private_key_and_never_overwrites(key_file):
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert len(key(key_file)) == 64
    with pytest.raises(ConfigError, match="exists already"):
        create_key_file(key_file)


def test_a_client_sends_its_token_from_the_config_or_the_environment(key_file, monkeypatch):
    token = issue_token(key(key_file), "alice", 3600)
    factory = get_auth_providers()["token"]
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert factory(ClientConfig(model_id="unused", auth="token", auth_token=token)).credentials() == {"token": token}
    with pytest.raises(ConfigError, match=f"pass auth_token=... or set {TOKEN_ENV}"):
        factory(ClientConfig(model_id="unused", auth="token"))
    monkeypatch.setenv(TOKEN_ENV, token)
    assert factory(ClientConfig(model_id="unused", auth="token")).credentials() == {"token": token}
    assert token not in repr(ClientConfig(model_id="unused", auth="token", auth_token=token))


def test_a_client_with_a_garbled_token_fails_before_calling_any_node():
    with pytest.raises(ConfigError, match="malformed"):
        get_auth_providers()["token"](ClientConfig(model_id="unused", auth="token", auth_token="fm1.oops"))


@pytest.mark.parametrize(("text", "seconds"), [("30d", 30 * 86400), ("12h", 43200), ("45m", 2700), ("90", 90)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_bad_durations_and_client_names_are_refused(key_file):
    for text in ("", "0d", "-1h", "3 days", "1y"):
        with pytest.raises(ConfigError, match="cannot read the duration"):
            parse_duration(text)
    for name in ("", "has space", "x" * 65, "-dash-first"):
        with pytest.raises(ConfigError, match="is not allowed"):
            issue_token(key(key_file), name, 60)


# ---- the CLI -------------------------------------------------------------------------------------
def test_cli_keygen_issue_and_revoke(tmp_path, capsys):
    """``farmesh token keygen``, ``farmesh token issue --client NAME --expires 30d --key-file PATH``
    (prints the token) and ``farmesh token revoke TOKEN --revoked-file PATH`` (prints its id)."""
    key_path, revoked_path = str(tmp_path / "mesh.key"), str(tmp_path / "revoked.txt")
    main(["token", "keygen", "--key-file", key_path])
    capsys.readouterr()
    main(["token", "issue", "--client", "alice", "--expires", "30d", "--key-file", key_path])
    token = capsys.readouterr().out.strip()
    claims = verify_token(token, key(key_path))
    assert claims.client == "alice" and claims.exp - time.time() == pytest.approx(30 * 86400, abs=5)
    main(["token", "revoke", token, "--revoked-file", revoked_path])
    assert capsys.readouterr().out.strip() == claims.id
    with open(revoked_path) as f:
        assert f.read().split() == [claims.id]
