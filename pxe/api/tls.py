"""A self-signed certificate and key for a test site (`pxe-stage api make-cert`).

A production site uses a certificate from its CA; this pair lets a lab or a test run the
HTTPS service at once. The client trusts it by pointing ``--ca-file`` (or ``[api] ca_file``,
or $DYNPROV_CA_FILE) at the certificate. Key: ECDSA P-256, written 0600 by temp + rename.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import Sequence
from pathlib import Path

from pxe import atomic
from pxe.errors import InputError


def make_cert(cert: Path, key: Path, names: Sequence[str] = (), ips: Sequence[str] = (),
              days: int = 365, force: bool = False) -> list[str]:
    """Write a self-signed pair valid for ``names`` and ``ips`` (default: this host's name,
    localhost, 127.0.0.1 and ::1). Returns the subject alternative names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not force:
        for p in (cert, key):
            if p.exists():
                raise InputError(f"{p} exists; use --force to replace it")
    if not 1 <= days <= 3650:
        raise InputError(f"invalid --days {days}: expected 1-3650")
    names = list(names) or [socket.gethostname(), "localhost"]
    try:
        addresses = [ipaddress.ip_address(a) for a in (list(ips) or ["127.0.0.1", "::1"])]
    except ValueError as exc:
        raise InputError(f"invalid IP address: {exc}") from None
    for n in names:
        if not n or len(n) > 253 or not all(c.isalnum() or c in ".-*" for c in n):
            raise InputError(f"invalid DNS name {n!r}")
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dynprov test site")])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(a) for a in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(private, hashes.SHA256())
    )
    atomic.write_bytes(key, private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), mode=0o600)
    atomic.write_bytes(cert, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return names + [str(a) for a in addresses]
