"""Certificates and keys for a medgen federation, made with ``cryptography`` only.

Three kinds of file, matching what Flower 1.42 reads:

* a federation CA (self-signed, CA:TRUE, keyCertSign): ``ca.crt`` / ``ca.key``. The
  SuperLink gets it as ``--ssl-ca-certfile``, every SuperNode as ``--root-certificates``.
* a SuperLink server certificate signed by that CA, with the hosts the SuperNodes dial as
  subjectAltName entries and the serverAuth EKU: ``server.crt`` / ``server.key``
  (``--ssl-certfile`` / ``--ssl-keyfile``). TLS authenticates the server only.
* one ECDSA key pair per hospital for SuperNode authentication. Flower loads the private
  key with ``load_ssh_private_key`` (flwr/supernode/cli/flower_supernode.py) and the
  public key for ``flwr supernode register KEY.pub`` with ``load_ssh_public_key``
  requiring a NIST curve (flwr/cli/supernode/register.py), so both files are in OpenSSH
  format (not PEM/PKCS8, which those loaders reject), on SECP384R1 like Flower's own
  ``generate_key_pairs``.

Private keys are written atomically through ``medgen.atomic`` whose temp file is created
by ``mkstemp`` with mode 0600 from the start, so a key is never readable by others, not
even for an instant. Existing keys are never overwritten unless ``force=True``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store

from medgen.atomic import atomic_write_bytes

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
CA_VALID_DAYS = 3650
# 397 days: the longest leaf lifetime browsers and most TLS stacks accept (CA/B forum).
SERVER_VALID_DAYS = 397
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DNS_LABEL = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                        r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key on disk (PEM)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode authentication key pair on disk (OpenSSH formats)."""

    private_key: Path
    public_key: Path


def create_ca(out_dir: str | os.PathLike, common_name: str, *,
              valid_days: int = CA_VALID_DAYS, force: bool = False) -> CertPair:
    """Create a self-signed federation CA in ``out_dir`` (``ca.crt``, ``ca.key``)."""
    if not common_name.strip():
        raise ValueError("create_ca: common_name is empty; give the federation a name")
    out = Path(out_dir)
    pair = CertPair(out / CA_CERT, out / CA_KEY)
    _refuse_overwrite([pair.cert, pair.key], force)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medgen federation")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(pair.key, _pem_private(key))
    atomic_write_bytes(pair.cert, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
    return pair


def create_server_cert(ca_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       hosts: tuple[str, ...] | list[str] = DEFAULT_HOSTS, *,
                       valid_days: int = SERVER_VALID_DAYS, force: bool = False) -> CertPair:
    """Create ``server.crt``/``server.key`` in ``out_dir``, signed by the CA in ``ca_dir``.

    ``hosts`` are the DNS names and IP addresses SuperNodes use to reach the SuperLink;
    each becomes a subjectAltName entry (a TLS client checks the name it dialled there).
    """
    hosts = list(dict.fromkeys(h.strip() for h in hosts if h.strip()))
    if not hosts:
        raise ValueError("create_server_cert: no hosts given; pass the SuperLink's DNS names/IPs")
    sans = [_san(h) for h in hosts]
    ca_cert, ca_key = load_ca(ca_dir)
    out = Path(out_dir)
    pair = CertPair(out / SERVER_CERT, out / SERVER_KEY)
    _refuse_overwrite([pair.cert, pair.key], force)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(pair.key, _pem_private(key))
    atomic_write_bytes(pair.cert, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
    return pair


def create_node_key(out_dir: str | os.PathLike, name: str, *, force: bool = False) -> NodeKeyPair:
    """Create a hospital's SuperNode auth key pair: ``<name>`` (private) and ``<name>.pub``.

    Pass ``<name>`` to ``flower-supernode --auth-supernode-private-key`` at the hospital
    and ``<name>.pub`` to ``flwr supernode register`` at the coordinator.
    """
    if not _NODE_NAME.match(name):
        raise ValueError(f"create_node_key: name {name!r} must be 1-64 characters of "
                         "letters, digits, '_', '.', '-' (it becomes a file name)")
    out = Path(out_dir)
    pair = NodeKeyPair(out / name, out / f"{name}.pub")
    _refuse_overwrite([pair.private_key, pair.public_key], force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write_private(pair.private_key, private)
    atomic_write_bytes(pair.public_key, public + f" medgen-{name}\n".encode(), mode=PUBLIC_MODE)
    return pair


def load_ca(ca_dir: str | os.PathLike) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read ``ca.crt`` and ``ca.key`` from ``ca_dir`` and check they belong together."""
    cert_path, key_path = Path(ca_dir) / CA_CERT, Path(ca_dir) / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; create the CA first (create_ca / "
                                    "`pki ca`)")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if cert.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ValueError(f"{key_path} is not the key of {cert_path}; regenerate the CA")
    return cert, key


def verify_chain(cert_path: str | os.PathLike, ca_cert_path: str | os.PathLike,
                 host: str) -> list[x509.Certificate]:
    """Verify a server certificate for ``host`` against the CA (RFC 5280 web PKI rules).

    Returns the verified chain (leaf first); raises
    ``cryptography.x509.verification.VerificationError`` when it does not verify.
    """
    leaf = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    ca = x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes())
    subject = _verification_subject(host)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    return verifier.verify(leaf, [])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_LABEL.match(host):
        raise ValueError(f"host {host!r} is neither an IP address nor a valid DNS name")
    return x509.DNSName(host.lower())


def _verification_subject(host: str) -> DNSName | IPAddress:
    try:
        return IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return DNSName(host)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    # Keep key folders private too; mkdir's mode applies only to folders it creates.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, data, mode=PRIVATE_MODE)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}; "
                              "pass force=True (--force) to replace them")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
