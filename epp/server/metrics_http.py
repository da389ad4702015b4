"""The EPP's Prometheus `/metrics` HTTP server, optionally behind Kubernetes auth.

Like the upstream EPP's `--metrics-endpoint-auth`: a scraper sends
`Authorization: Bearer <token>`; the token is checked with a TokenReview and the
authenticated user with a SubjectAccessReview for the non-resource URL (`get /metrics`),
so a ClusterRole with `nonResourceURLs: [/metrics]` (deploy/kubernetes/metrics-reader.yaml)
decides who may scrape. 401 without or with an invalid token, 403 when not authorized,
503 (and a log line) when the API server cannot be asked.

The server runs in its own threads (`ThreadingHTTPServer`), never on the event loop: an
exposition takes about a millisecond and a review a network round trip, neither of which
may delay a request being routed. Decisions are cached per token for a short while so that
a Prometheus scraping every few seconds costs the API server two calls a minute.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import urlparse

from prometheus_client.exposition import MetricsHandler

log = logging.getLogger(__name__)


class ReviewUnavailable(Exception):
    """The API server could not be asked (network, timeout, 5xx, or the EPP lacks RBAC)."""


@dataclass(frozen=True, slots=True)
class User:
    """Who a TokenReview says the token belongs to."""

    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


class Reviewer(Protocol):
    """Asks the API server. Both methods block (they run on the server's threads) and
    raise ReviewUnavailable when no answer can be had."""

    def authenticate(self, token: str) -> User | None:
        """The token's user, or None if the token is not valid."""
        ...

    def authorize(self, user: User, path: str, verb: str) -> bool:
        """Whether `user` may `verb` the non-resource URL `path`."""
        ...


@dataclass(frozen=True, slots=True)
class Decision:
    status: int  # 200, 401, 403 or 503
    reason: str
    user: str = ""


class KubernetesReviewer:
    """TokenReview (authentication.k8s.io/v1) + SubjectAccessReview (authorization.k8s.io/v1)
    through the `kubernetes` client; the EPP's service account needs `create` on both."""

    def __init__(self, api_client: Any, timeout: float = 5.0) -> None:
        from kubernetes import client

        self._api = api_client
        self._authn = client.AuthenticationV1Api(api_client)
        self._authz = client.AuthorizationV1Api(api_client)
        self._client = client
        self.timeout = timeout

    def authenticate(self, token: str) -> User | None:
        c = self._client
        body = c.V1TokenReview(spec=c.V1TokenReviewSpec(token=token))
        try:
            review = self._authn.create_token_review(body, _request_timeout=self.timeout)
        except Exception as e:  # noqa: BLE001 - ApiException, urllib3 errors, timeouts
            raise ReviewUnavailable(f"TokenReview failed: {_describe(e)}") from None
        st = review.status
        if st is None or not st.authenticated or st.user is None:
            return None
        u = st.user
        extra = tuple(sorted((k, tuple(v or ())) for k, v in (u.extra or {}).items()))
        return User(name=u.username or "", uid=u.uid or "", groups=tuple(u.groups or ()),
                    extra=extra)

    def authorize(self, user: User, path: str, verb: str) -> bool:
        c = self._client
        body = c.V1SubjectAccessReview(spec=c.V1SubjectAccessReviewSpec(
            user=user.name, uid=user.uid or None, groups=list(user.groups) or None,
            extra={k: list(v) for k, v in user.extra} or None,
            non_resource_attributes=c.V1NonResourceAttributes(path=path, verb=verb)))
        try:
            review = self._authz.create_subject_access_review(body, _request_timeout=self.timeout)
        except Exception as e:  # noqa: BLE001
            raise ReviewUnavailable(f"SubjectAccessReview failed: {_describe(e)}") from None
        return bool(review.status is not None and review.status.allowed)

    def close(self) -> None:
        self._api.close()


def _describe(e: Exception) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status is not None:
        return f"HTTP {status} {reason or ''}".strip()
    return f"{type(e).__name__}: {e}"


class MetricsAuth:
    """Bearer-token check with a bounded, short-lived cache of decisions per token.

    Allowed decisions live `allow_ttl` seconds, denied ones (401 and 403) `deny_ttl`; an
    unreachable API server is never cached, so the next scrape asks again. Tokens are kept
    only as SHA-256 digests. Thread-safe: the HTTP server calls it from many threads.
    """

    def __init__(self, reviewer: Reviewer, *, allow_ttl: float = 60.0, deny_ttl: float = 10.0,
                 max_entries: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.reviewer = reviewer
        self.allow_ttl = allow_ttl
        self.deny_ttl = deny_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._cache: OrderedDict[tuple[bytes, str, str], tuple[float, Decision]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._cache)

    def check(self, authorization: str | None, path: str, verb: str = "get") -> Decision:
        """The decision for a request with this `Authorization` header value."""
        token = _bearer(authorization)
        if token is None:
            return Decision(401, "Unauthorized")
        key = (hashlib.sha256(token.encode()).digest(), path, verb)
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                if hit[0] > now:
                    self._cache.move_to_end(key)
                    return hit[1]
                del self._cache[key]
        try:
            decision = self._review(token, path, verb)
        except ReviewUnavailable as e:
            log.warning("metrics auth: cannot reach the API server, answering 503: %s", e)
            return Decision(503, "Authentication or authorization unavailable")
        ttl = self.allow_ttl if decision.status == 200 else self.deny_ttl
        with self._lock:
            self._cache[key] = (now + ttl, decision)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return decision

    def _review(self, token: str, path: str, verb: str) -> Decision:
        user = self.reviewer.authenticate(token)
        if user is None:
            return Decision(401, "Unauthorized")
        if not self.reviewer.authorize(user, path, verb):
            log.info("metrics auth: %s may not %s %s", user.name, verb, path)
            return Decision(403, f"Authorization denied for user {user.name}", user.name)
        return Decision(200, "OK", user.name)

    def close(self) -> None:
        close = getattr(self.reviewer, "close", None)
        if close is not None:
            close()


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


STATUS_PATH = "/debug/status"


class _Handler(MetricsHandler):
    auth: MetricsAuth | None = None
    status_page: Callable[[], bytes] | None = None

    def do_GET(self) -> None:
        path = urlparse(self.path).path or "/"
        if self.auth is not None:
            d = self.auth.check(self.headers.get("Authorization"), path, "get")
            if d.status != 200:
                self._plain(d.status, d.reason)
                return
        if path == STATUS_PATH and self.status_page is not None:
            try:
                body = self.status_page()
            except Exception as e:  # noqa: BLE001 - the loop is busy or stopping
                log.warning("status page unavailable: %s", type(e).__name__)
                self._plain(503, "status page unavailable, try again")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def _plain(self, status: int, reason: str) -> None:
        body = (reason + "\n").encode()
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="epp-metrics"')
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class MetricsServer:
    """Serves `registry` over HTTP on its own threads; `auth=None` serves everyone.
    `status_page`, when given, answers /debug/status (behind the same auth)."""

    def __init__(self, registry: Any, *, auth: MetricsAuth | None = None,
                 status_page: Callable[[], bytes] | None = None) -> None:
        self.registry = registry
        self.auth = auth
        self.status_page = status_page
        self.port = 0
        self._httpd: _Server | None = None

    def start(self, host: str, port: int) -> int:
        """Bind and serve in a daemon thread; returns the bound port (raises OSError)."""
        page = self.status_page
        handler = type("EppMetricsHandler", (_Handler,), {
            "registry": self.registry, "auth": self.auth,
            "status_page": staticmethod(page) if page is not None else None})
        family_host = host or "0.0.0.0"
        if ":" in family_host:
            import socket

            class _Server6(_Server):
                address_family = socket.AF_INET6
            self._httpd = _Server6((family_host, port), handler)
        else:
            self._httpd = _Server((family_host, port), handler)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                         name="metrics-http", daemon=True).start()
        return self.port

    def stop(self) -> None:
        """Stop accepting without blocking the caller (shutdown waits for the poll loop)."""
        httpd, self._httpd = self._httpd, None
        auth = self.auth

        def close() -> None:
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
            if auth is not None:
                auth.close()

        threading.Thread(target=close, name="metrics-http-stop", daemon=True).start()


def kubernetes_auth(kubeconfig: str | None) -> MetricsAuth:
    """A MetricsAuth asking the API server of `kubeconfig` (or in-cluster); blocking, as
    loading credentials reads files. Raises SettingsError (a ValueError) if it cannot load."""
    from epp.k8s.settings import load_api_client

    return MetricsAuth(KubernetesReviewer(load_api_client(kubeconfig, pool_maxsize=4)))
