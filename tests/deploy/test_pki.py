"""PKI: chain verification, SANs, key file modes, Flower's own key loaders, real TLS."""

from __future__ import annotations

import argparse
import ipaddress
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import VerificationError

from medgen.deploy import cli_pki, pki

HOSTS = ("localhost", "127.0.0.1", "superlink.example.org", "10.0.0.7")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(root / "ca", "test federation CA")
    server = pki.create_server_cert(root / "ca", root / "server", HOSTS)
    other_ca = pki.create_ca(root / "other", "someone else's CA")
    node = pki.create_node_key(root / "nodes", "site-a")
    return {"root": root, "ca": ca, "server": server, "other_ca": other_ca, "node": node}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_a_ca(federation):
    cert = x509.load_pem_x509_certificate(federation["ca"].cert.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.subject == cert.issuer


@pytest.mark.parametrize("host", HOSTS)
def test_server_cert_verifies_for_every_host(federation, host):
    chain = pki.verify_chain(federation["server"].cert, federation["ca"].cert, host)
    assert len(chain) == 2


def test_server_cert_rejected_for_other_host_and_other_ca(federation):
    with pytest.raises(VerificationError):
        pki.verify_chain(federation["server"].cert, federation["ca"].cert, "evil.example.org")
    with pytest.raises(VerificationError):
        pki.verify_chain(federation["server"].cert, federation["other_ca"].cert, "localhost")


def test_server_cert_sans_and_eku(federation):
    cert = x509.load_pem_x509_certificate(federation["server"].cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.7")}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_default_hosts_are_localhost(tmp_path, federation):
    pair = pki.create_server_cert(federation["root"] / "ca", tmp_path)
    san = x509.load_pem_x509_certificate(pair.cert.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_private_keys_are_0600_public_files_are_not_secret(federation):
    for key in (federation["ca"].key, federation["server"].key, federation["node"].private_key):
        assert _mode(key) == 0o600, key
    assert _mode(federation["node"].public_key) == 0o644


def test_private_key_never_world_readable_while_written(tmp_path, monkeypatch):
    # The temp file behind the atomic write must already be 0600 when bytes go in.
    import os as os_module

    seen = []
    real_fdopen = os_module.fdopen

    def spy(fd, *args, **kwargs):
        seen.append(stat.S_IMODE(os_module.fstat(fd).st_mode))
        return real_fdopen(fd, *args, **kwargs)

    monkeypatch.setattr(os_module, "fdopen", spy)
    pki.create_node_key(tmp_path, "site-b")
    assert seen and all(mode == 0o600 for mode in seen)


def test_refuses_to_overwrite_without_force(federation, tmp_path):
    before = federation["ca"].key.read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        pki.create_ca(federation["root"] / "ca", "again")
    with pytest.raises(FileExistsError):
        pki.create_node_key(federation["root"] / "nodes", "site-a")
    assert federation["ca"].key.read_bytes() == before
    first = pki.create_node_key(tmp_path, "site-c").private_key.read_bytes()
    second = pki.create_node_key(tmp_path, "site-c", force=True).private_key.read_bytes()
    assert first != second


def test_bad_input_is_refused(tmp_path, federation):
    with pytest.raises(ValueError, match="name"):
        pki.create_node_key(tmp_path, "../escape")
    with pytest.raises(ValueError, match="host"):
        pki.create_server_cert(federation["root"] / "ca", tmp_path, ["not a host!"])
    with pytest.raises(FileNotFoundError, match="ca.crt"):
        pki.create_server_cert(tmp_path / "missing", tmp_path, ["localhost"])


def test_flower_loaders_accept_node_keys(federation):
    """Load the pair exactly as flower-supernode and `flwr supernode register` do."""
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (bytes_to_public_key,
                                                       public_key_to_bytes, sign_message,
                                                       verify_signature)
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    node = federation["node"]
    args = argparse.Namespace(auth_supernode_private_key=str(node.private_key),
                              auth_supernode_public_key=None)
    private_key, public_key = _try_setup_client_authentication(args)
    registered = try_load_public_key(node.public_key)
    # The key the SuperLink registers is the one the node signs with.
    assert registered == public_key_to_bytes(public_key)
    signature = sign_message(private_key, b"medgen")
    assert verify_signature(bytes_to_public_key(registered), b"medgen", signature)


def test_flower_loader_rejects_pem_pkcs8_private_key(federation):
    # Guards the format choice: Flower 1.42 reads OpenSSH keys, PEM/PKCS8 exits.
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    args = argparse.Namespace(auth_supernode_private_key=str(federation["ca"].key),
                              auth_supernode_public_key=None)
    with pytest.raises(SystemExit):
        _try_setup_client_authentication(args)


def _echo_server(server_pair: pki.CertPair):
    credentials = grpc.ssl_server_credentials(
        [(server_pair.key.read_bytes(), server_pair.cert.read_bytes())])
    handler = grpc.method_handlers_generic_handler(
        "medgen.Echo", {"Say": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def tls_server(federation):
    server, port = _echo_server(federation["server"])
    yield port
    server.stop(grace=None).wait()


def _call(port: int, ca_cert: Path, target_host: str | None = None) -> bytes:
    options = [("grpc.ssl_target_name_override", target_host)] if target_host else []
    creds = grpc.ssl_channel_credentials(root_certificates=ca_cert.read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        say = channel.unary_unary("/medgen.Echo/Say")
        return say(b"hello", timeout=10)


def test_tls_handshake_with_our_ca(federation, tls_server):
    assert _call(tls_server, federation["ca"].cert) == b"hello"
    assert _call(tls_server, federation["ca"].cert, "localhost") == b"hello"


def test_tls_handshake_fails_with_other_ca(federation, tls_server):
    with pytest.raises(grpc.RpcError) as err:
        _call(tls_server, federation["other_ca"].cert)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_handshake_fails_for_name_not_in_san(federation, tls_server):
    with pytest.raises(grpc.RpcError):
        _call(tls_server, federation["ca"].cert, "evil.example.org")


def test_cli_end_to_end(tmp_path, capsys):
    assert cli_pki.main(["ca", "--out", str(tmp_path / "ca")]) == 0
    assert cli_pki.main(["server-cert", "--ca", str(tmp_path / "ca"), "--out",
                         str(tmp_path / "srv"), "--host", "link.local", "--host", "10.1.2.3"]) == 0
    assert cli_pki.main(["node-key", "--out", str(tmp_path / "n"), "--name", "site-a"]) == 0
    assert cli_pki.main(["verify", "--ca-cert", str(tmp_path / "ca" / "ca.crt"), "--cert",
                         str(tmp_path / "srv" / "server.crt"), "--host", "10.1.2.3"]) == 0
    assert cli_pki.main(["verify", "--ca-cert", str(tmp_path / "ca" / "ca.crt"), "--cert",
                         str(tmp_path / "srv" / "server.crt"), "--host", "localhost"]) == 1
    assert cli_pki.main(["ca", "--out", str(tmp_path / "ca")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
