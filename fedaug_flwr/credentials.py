"""TLS certificates and SuperNode authentication keys for a Flower deployment.

For a deployment on one machine (and for the tests) this makes a private
certificate authority, a SuperLink certificate signed by it for the given
host names / IP addresses, and one EC key pair per SuperNode in the OpenSSH
format that ``flower-supernode --auth-supernode-private-key`` and
``flwr supernode register`` read. Across real machines, use certificates from
your organisation's CA instead (docs/deployment.md shows both).

Private keys are written readable by their owner only.
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
            "--ssl-ca-certfile", str(self.ca_certificate),
            "--ssl-certfile", str(self.server_certificate),
            "--ssl-keyfile", str(self.server_key),
        ]  # fmt: skip


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    return path


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


def make_tls_files(folder: Path, hosts: Sequence[str] = LOOPBACK_NAMES, days: int = 30) -> TlsFiles:
    """A new CA and a SuperLink certificate for ``hosts`` (IP addresses or DNS names)."""
    if not hosts:
        raise ValueError("need at least one host name or IP address for the certificate")
    folder.mkdir(parents=True, exist_ok=True)
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
        )  # fmt: skip
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
    (folder / "ca.crt").write_bytes(ca_certificate.public_bytes(pem))
    (folder / "server.pem").write_bytes(server_certificate.public_bytes(pem))
    _write_private(folder / "ca.key", _pem_key(ca_key))
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
    public_path = folder / f"{name}.pub"
    public_path.write_bytes(public + b"\n")
    return NodeKeys(private_path, public_path)
