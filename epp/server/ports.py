"""Binding a grpc.aio server's port with an error `serve` reports like any other.

grpcio raises a bare RuntimeError ("Failed to bind ... set GRPC_VERBOSITY=debug") for a
port in use or an unusable address; the EPP turns it into an OSError naming the listener,
logged as "cannot start" without a traceback. Servers are created with SO_REUSEPORT off
(`NO_REUSEPORT`), else grpcio would share a port with another process silently.
"""

from __future__ import annotations

import errno
from typing import Any

import grpc

NO_REUSEPORT = ("grpc.so_reuseport", 0)


def bind(server: grpc.aio.Server, what: str, address: str, credentials: Any = None) -> int:
    """Add `address` (host:port) to `server`; the port bound (for port 0: the one chosen)."""
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:
        raise OSError(errno.EADDRINUSE, f"cannot bind the {what} port {address}: in use, "
                                        f"or not an address of this host") from None
