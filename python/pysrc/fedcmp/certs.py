"""Certificates and keys for a federation across sites: a CA and a
SuperLink certificate (server-side TLS; Flower has no client
certificates), and an EC P-384 OpenSSH key pair per SuperNode for
Flower's SuperNode authentication (what ``ssh-keygen -t ecdsa -b 384``
writes).

    python -m fedcmp.certs DIR [--hosts 127.0.0.1 localhost] [--nodes 2]

writes DIR/ca.crt, DIR/server.pem, DIR/server.key and DIR/node<i>,
DIR/node<i>.pub. For a real deployment, have the certificates issued the
way your organisation issues any server's, and let every site create its
own key pair and send only the ``.pub`` file to the operator.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def write_tls(dir: Path, hosts: list[str] | None = None, days: int = 365) -> tuple[Path, Path, Path]:
    """A CA and a SuperLink certificate valid for ``hosts`` (default:
    127.0.0.1 and localhost): (ca.crt, server.pem, server.key)."""
    hosts = hosts or ["127.0.0.1", "localhost"]
    dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcmp federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (dir / "ca.crt", dir / "server.pem", dir / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        paths[2],
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return paths


def write_node_key(path: Path) -> Path:
    """An EC P-384 OpenSSH key pair at ``path`` and ``path.pub``; returns
    the public key's path (the file to register with ``flwr supernode
    register``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return pub


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedcmp.certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"])
    parser.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to write")
    args = parser.parse_args(argv)
    ca, cert, key = write_tls(args.dir, args.hosts)
    print(f"CA {ca}\nSuperLink certificate {cert} (key {key}) for {', '.join(args.hosts)}")
    for i in range(args.nodes):
        print(f"SuperNode key {args.dir / f'node{i}'} (register {write_node_key(args.dir / f'node{i}')})")


if __name__ == "__main__":
    main()
