"""What the Kubernetes source needs to know, and how it reaches the API server.

Kept apart from the watches so that `cli.py` can build and validate these settings (and
report a bad flag as a usage error) before anything touches the network.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

GROUP_V1 = "inference.networking.k8s.io"
"""The InferencePool group and version the gateway API inference extension graduated to."""
GROUP_X = "inference.networking.x-k8s.io"
"""The experimental group: the older v1alpha2 InferencePool, objectives, rewrites, models."""

POOL_VERSIONS = {GROUP_V1: "v1", GROUP_X: "v1alpha2"}

_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


class SettingsError(ValueError):
    """A flag value that cannot work; `cli.py` should print it and exit with status 2."""


def parse_selector(text: str) -> dict[str, str]:
    """Parse ``app=vllm,tier=gpu`` (equality terms only, like a Service selector)."""
    out: dict[str, str] = {}
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip().lstrip("=")  # accept `==` too
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise SettingsError(f"bad label selector term {term!r}: want key=value")
        out[key] = value
    if not out:
        raise SettingsError(f"empty label selector {text!r}")
    return out


def parse_ports(text: str) -> tuple[int, ...]:
    """Parse ``8000`` or ``8000,8001`` into distinct TCP ports, order kept (it sets ranks)."""
    ports: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            port = int(part)
        except ValueError:
            raise SettingsError(f"bad port {part!r}") from None
        if not 0 < port < 65536:
            raise SettingsError(f"port {port} out of range")
        if port in ports:
            raise SettingsError(f"port {port} listed twice")
        ports.append(port)
    if not ports:
        raise SettingsError(f"no ports in {text!r}")
    return tuple(ports)


def default_identity() -> str:
    """A leader-election identity unique per process: pod name (hostname) plus pid."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}"


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """Flags of the Kubernetes source (upstream names in comments)."""

    pool_name: str | None = None  # --pool-name
    pool_namespace: str = "default"  # --pool-namespace (env NAMESPACE when unset)
    pool_group: str = GROUP_V1  # --pool-group
    endpoint_selector: dict[str, str] | None = None  # --endpoint-selector (standalone)
    endpoint_target_ports: tuple[int, ...] = ()  # --endpoint-target-ports (standalone)
    kubeconfig: str | None = None  # --kubeconfig; None: in-cluster, then ~/.kube/config
    watch_objectives: bool = True  # objectives/rewrites/models (pool mode only)
    # leader election (--ha-enable-leader-election)
    leader_election: bool = False
    lease_name: str | None = None  # default: epp-<pool>-leader
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    identity: str = field(default_factory=default_identity)
    # watch tuning
    watch_timeout: int = 300  # server-side timeoutSeconds of one watch call (jittered)
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if self.pool_name and self.endpoint_selector:
            raise SettingsError("--pool-name and --endpoint-selector are exclusive")
        if not self.pool_name and not self.endpoint_selector:
            raise SettingsError("set --pool-name, or --endpoint-selector with --endpoint-target-ports")
        if self.endpoint_selector and not self.endpoint_target_ports:
            raise SettingsError("--endpoint-selector needs --endpoint-target-ports")
        if self.pool_group not in POOL_VERSIONS:
            raise SettingsError(
                f"--pool-group must be one of {sorted(POOL_VERSIONS)}, not {self.pool_group!r}"
            )
        if self.leader_election and not self.renew_deadline < self.lease_duration:
            raise SettingsError("renew deadline must be shorter than the lease duration")

    @property
    def standalone(self) -> bool:
        """True when pods are selected by a flag and no CRD is read."""
        return self.pool_name is None

    @property
    def pool_version(self) -> str:
        return POOL_VERSIONS[self.pool_group]

    @property
    def lease(self) -> str:
        return self.lease_name or f"epp-{self.pool_name or 'standalone'}-leader"


def load_api_client(kubeconfig: str | None = None, *, pool_maxsize: int = 16) -> Any:
    """An ApiClient from the kubeconfig file if given, else in-cluster, else ~/.kube/config.

    Loading reads files only; the first network call happens in the watches.
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg)
    except Exception as e:  # noqa: BLE001 - ConfigException, OSError, or the client choking on a malformed file
        # A missing or broken kubeconfig is a usage error (exit 2 naming it), not a crash.
        where = kubeconfig or "in-cluster config or ~/.kube/config"
        raise SettingsError(f"cannot load Kubernetes credentials from {where}: {e}") from None
    cfg.connection_pool_maxsize = pool_maxsize
    return client.ApiClient(configuration=cfg)


def kubernetes_settings(s: Any) -> KubernetesSettings | None:
    """The Kubernetes source's settings from the EPP's parsed flags (`epp.settings.Settings`),
    or None when the endpoints come from elsewhere (`--endpoints`, `--endpoints-file`).

    Pool mode: `--pool-name` (objectives come from the cluster unless `--objectives-file`).
    Standalone on Kubernetes: `--endpoint-selector` with `--endpoint-target-ports`.
    Raises SettingsError for a combination that cannot work.
    """
    selector_text = getattr(s, "endpoint_selector", None)
    pool = getattr(s, "pool_name", "") or None
    if selector_text and (pool or getattr(s, "endpoints", None)
                          or getattr(s, "endpoints_file", None)):
        # Two sources would overwrite each other's endpoint sets in the datastore.
        raise SettingsError("--endpoint-selector cannot be combined with --pool-name, "
                            "--endpoints or --endpoints-file")
    if not selector_text and (not pool or getattr(s, "endpoints", None)
                              or getattr(s, "endpoints_file", None)):
        return None
    ports = tuple(getattr(s, "endpoint_target_ports", ()) or ())
    return KubernetesSettings(
        pool_name=None if selector_text else pool,
        pool_namespace=getattr(s, "pool_namespace", None) or os.environ.get("NAMESPACE", "default"),
        pool_group=getattr(s, "pool_group", GROUP_V1) or GROUP_V1,
        endpoint_selector=parse_selector(selector_text) if selector_text else None,
        endpoint_target_ports=parse_ports(",".join(map(str, ports))) if ports else (),
        kubeconfig=getattr(s, "kubeconfig", None),
        watch_objectives=not getattr(s, "objectives_file", None),
        leader_election=bool(getattr(s, "ha_enable_leader_election", False)),
    )
