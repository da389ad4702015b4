"""gRPC server reflection that also answers for `package.Service.Method` symbols.

ghz (and other clients) ask reflection for the file holding a method's full name. The
upb-backed protobuf descriptor pool resolves services but not methods, so such a lookup
fails with "Symbol not found"; this pool falls back from the method to its service.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection

SERVICE_NAME = reflection.SERVICE_NAME


class _MethodAwarePool:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, name: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(name)
        except KeyError:
            service, _, method = name.rpartition(".")
            svc = self._pool.FindServiceByName(service)  # KeyError when not a service
            if method not in svc.methods_by_name:
                raise
            return svc.file

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._pool, attr)


def enable(server: grpc.aio.Server, service_names: list[str]) -> None:
    reflection.enable_server_reflection(
        [*service_names, SERVICE_NAME], server, pool=_MethodAwarePool(descriptor_pool.Default()))
