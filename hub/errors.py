"""HubError: one exception for everything that can go wrong getting a bundle by reference.

Each kind is a situation users meet (no network, 404, private repository, checksum mismatch, ...); the message
names the reference, says what happened and what to do.
"""

from __future__ import annotations

BAD_REFERENCE = "bad_reference"
NO_NETWORK = "no_network"
DNS = "dns"
TIMEOUT = "timeout"
TLS = "tls"
OFFLINE = "offline"
NOT_FOUND = "not_found"
UNAUTHORIZED = "unauthorized"
SERVER = "server"
CHECKSUM = "checksum"
TOO_LARGE = "too_large"
NOT_BUNDLE = "not_bundle"
DISK_FULL = "disk_full"
CUT = "cut"
CATALOG = "catalog"


class HubError(RuntimeError):
    """A bundle reference could not be resolved, downloaded or verified. `kind` is one of the constants above."""

    def __init__(self, kind: str, message: str, *, reference: str | None = None):
        self.kind = kind
        self.reference = reference
        super().__init__(f"{reference}: {message}" if reference else message)
