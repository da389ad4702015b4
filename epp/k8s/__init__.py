"""Kubernetes integration: InferencePool / Pod / objective watches and leader election.

Entry points: `KubernetesSource` (feeds the datastore and the objective store),
`LeaderElector` (Lease-based HA), `KubernetesSettings` (the flags).
"""

from epp.k8s.leader import LeaderElector
from epp.k8s.settings import (
    KubernetesSettings,
    SettingsError,
    kubernetes_settings,
    load_api_client,
    parse_ports,
    parse_selector,
)
from epp.k8s.source import KubernetesSource, ObjectiveSink

__all__ = [
    "KubernetesSettings",
    "KubernetesSource",
    "LeaderElector",
    "ObjectiveSink",
    "SettingsError",
    "kubernetes_settings",
    "load_api_client",
    "parse_ports",
    "parse_selector",
]
