# -*- test-case-name: tests.test_tls -*-
"""TLS served by the server itself: the certificate, the key, the header.

C{--tls-cert} names a PEM file with the server's certificate, optionally
followed by its intermediate certificates (a ``fullchain.pem`` as ACME
clients write it); C{--tls-key} names the PEM file with its unencrypted
private key. Both are read and checked against each other once when the
options are parsed, so a wrong file costs one line and exit status 2, not
a server that starts and then fails every handshake; and once more when the
server starts listening (a renewed certificate is picked up by a restart).

With TLS on, every HTTP response carries C{Strict-Transport-Security}, the
login cookie is C{Secure}, and websockets are ``wss://`` on the same port.
"""

from __future__ import annotations

import re

from cryptography.exceptions import UnsupportedAlgorithm
from twisted.internet.interfaces import IAddress
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from cellmux.config import ConfigError

__all__ = ["TLSFactory", "certificate_options", "hsts_header"]

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the TLS {what} {path}: {e.strerror or e}") from None


def certificate_options(cert_path: str, key_path: str):
    """Twisted's C{CertificateOptions} for a certificate chain and its key.

    @raise ConfigError: one line saying what is wrong with which file:
        unreadable, not PEM, an encrypted key, or a key that does not
        belong to the certificate.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from OpenSSL import SSL
    from twisted.internet import ssl

    chain = _PEM_CERTIFICATE.findall(_read(cert_path, "certificate"))
    if not chain:
        raise ConfigError(f"the TLS certificate {cert_path} has no PEM certificate in it")
    try:
        certificates = [x509.load_pem_x509_certificate(pem) for pem in chain]
    except ValueError as e:
        raise ConfigError(f"the TLS certificate {cert_path} is not valid PEM: {e}") from None
    key_pem = _read(key_path, "key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # it needs a password; a prompt would hang a supervised server
        raise ConfigError(f"the TLS key {key_path} is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"the TLS key {key_path} is not a PEM private key: {e}") from None
    # cryptography's types: pyOpenSSL deprecates its own X509 and PKey.
    options = ssl.CertificateOptions(
        # Twisted takes cryptography's types; its annotations say pyOpenSSL's.
        privateKey=key,  # type: ignore[arg-type]
        certificate=certificates[0],  # type: ignore[arg-type]
        extraCertChain=certificates[1:],  # type: ignore[arg-type]
        # Websockets upgrade from HTTP/1.1 only (Autobahn speaks no h2):
        # never let ALPN pick h2 for a browser.
        acceptableProtocols=[b"http/1.1"],
    )
    try:
        options.getContext()  # builds the context: checks that the key fits
    except SSL.Error:
        raise ConfigError(
            f"the TLS key {key_path} does not belong to the certificate in {cert_path}"
        ) from None
    return options


def hsts_header(max_age: int) -> bytes | None:
    """The C{Strict-Transport-Security} value, or None when it is off (0)."""
    return f"max-age={max_age}".encode() if max_age > 0 else None


class TLSFactory(TLSMemoryBIOFactory):
    """TLS around a factory that may refuse a connection (returns None).

    The descriptor guard (limits.py) sits inside TLS, so that its 503
    answer reaches the client encrypted; a connection it drops unanswered
    is closed before any handshake.
    """

    # The wrapped factory may refuse a connection (None), which Twisted's
    # signature for WrappingFactory.buildProtocol leaves out.
    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return self.protocol(self, wrapped)
