"""TLS certificates and SuperNode authentication keys for a Flower deployment.

For a deployment on one machine (and for the tests) this makes a private
certificate authority, a SuperLink certificate signed by it for the given
host names / IP addresses, and one EC key pair per SuperNode in the OpenSSH
format that ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register`` read. Across real machines, use certificates from
your organisation's CA instead (docs/deployment.md shows both).

Private keys are written readable by their owner only (mode 0600), each to a
new file: an existing file or symbolic link in its place is removed first,
never written through, so neither a looser mode nor a link survives. Folders
holding keys are made private (0700). The CA's private key is used to sign the
SuperLink certificate and then dropped unless it is asked for
(``keep_ca_key``): a deployment only needs ``ca.crt``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Flower accepts NIST curves for SuperNode keys; P-384 is the one its docs use.
CURVE = ec.SECP384R1
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class TlsFiles:
    """``ca.crt`` (give to every SuperNode and to ``flwr``), ``server.pem`` / ``server.key``."""

    ca_certificate: Path
    server_certificate: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        return [
            "--ssl-ca-certfile",
            str(self.ca_certificate),
            "--ssl-certfile",
            str(self.server_certificate),
            "--ssl-keyfile",
            str(self.server_key),
        ]


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path
    public_key: Path


def private_folder(folder: Path) -> Path:
    """``folder`` created if needed and made accessible to its owner only (0700)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def _write_new(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new file of ``mode``: never through an existing file or link."""
    path.unlink(missing_ok=True)  # a link is removed itself, not followed
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(path, flags, mode)
    os.fchmod(descriptor, mode)  # whatever the umask
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return path


def _write_private(path: Path, data: bytes) -> Path:
    """A private key: mode 0600 in a 0700 folder."""
    private_folder(path.parent)
    return _write_new(path, data, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedaug-flwr deployment"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_files(
    folder: Path,
    hosts: Sequence[str] = LOOPBACK_NAMES,
    days: int = 30,
    keep_ca_key: bool = False,
) -> TlsFiles:
    """A new CA and a SuperLink certificate for ``hosts`` (IP addresses or DNS names).

    The CA's key signs the certificate and is then forgotten; with
    ``keep_ca_key`` it is written to ``ca.key`` (0600), e.g. to sign more later.
    """
    if not hosts:
        raise ValueError("need at least one host name or IP address for the certificate")
    private_folder(folder)
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))

    ca_key = ec.generate_private_key(CURVE())
    ca_name = _name("fedaug-flwr local CA")
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(CURVE())
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    _write_new(folder / "ca.crt", ca_certificate.public_bytes(pem), 0o644)
    _write_new(folder / "server.pem", server_certificate.public_bytes(pem), 0o644)
    if keep_ca_key:
        _write_private(folder / "ca.key", _pem_key(ca_key))
    else:
        (folder / "ca.key").unlink(missing_ok=True)  # none from an earlier call either
    _write_private(folder / "server.key", _pem_key(server_key))
    return TlsFiles(folder / "ca.crt", folder / "server.pem", folder / "server.key")


def make_node_keys(folder: Path, name: str) -> NodeKeys:
    """An EC key pair in OpenSSH format: ``<name>`` (private) and ``<name>.pub``."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    private_path = _write_private(folder / name, private)
    public_path = _write_new(folder / f"{name}.pub", public + b"\n", 0o644)
    return NodeKeys(private_path, public_path)
