"""The API listener's TLS: server certificate and key, and optionally client certificates (mTLS)
signed by a CA the operator names, whose subject CN becomes the user name."""

from __future__ import annotations

import ssl

from mirror.config import TlsConfig
from mirror.errors import ConfigError


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(context, tls)
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls.client_ca: cannot load {tls.client_ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED if tls.client_certs == "required" else ssl.CERT_OPTIONAL
    return context


def reload_certificate(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """Reload the certificate chain and key: new handshakes use them, open connections keep theirs.

    A pair that does not load (a certificate renewed before its key was written) must not touch
    the live context, where OpenSSL would already have dropped the old key: it is tried on a
    scratch context first."""
    _load(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), tls)
    _load(context, tls)


def _load(context: ssl.SSLContext, tls: TlsConfig) -> None:
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        # Neither path nor OpenSSL's message carries key material.
        raise ConfigError(f"tls: cannot load the certificate {tls.cert} with its key {tls.key}: {exc}") from exc
