"""A server's TLS context from PEM files named by settings."""

from __future__ import annotations

import ssl
from pathlib import Path

from bridge.errors import ConfigError


def server_context(cert: Path, key: Path, *, settings: str) -> ssl.SSLContext:
    """TLS 1.2 or later with ``cert`` (the PEM chain, leaf first) and ``key``; a file that
    cannot be read or does not match is a :class:`ConfigError` naming ``settings``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{settings}: cannot load certificate {cert} / key {key}: {exc}") from exc
    return context
