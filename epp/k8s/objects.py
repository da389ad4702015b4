"""Pure functions from Kubernetes objects (plain JSON dicts) to the EPP's own data.

No I/O here, so the rules (which pods count, how endpoints are named, which objectives
belong to the pool) are unit-testable without an API server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from epp.datastore import Endpoint
from epp.k8s.settings import GROUP_V1, GROUP_X

ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
"""Comma-separated target ports a pod serves right now; absent means all of them."""


class InvalidObject(ValueError):
    """An object whose spec the EPP cannot use; it is logged and ignored."""


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """The parts of an InferencePool (either group) that decide the endpoint set."""

    name: str
    namespace: str
    selector: Mapping[str, str]
    target_ports: tuple[int, ...]
    app_protocol: str = "http"
    endpoint_picker: Mapping[str, Any] = field(default_factory=dict)
    resource_version: str = ""


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def object_key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _meta(obj)
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def parse_pool(obj: Mapping[str, Any], group: str) -> PoolSpec:
    """Read an InferencePool of `group` (v1 `targetPorts` or v1alpha2 `targetPortNumber`)."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidObject("InferencePool has no spec")
    ns, name = object_key(obj)
    sel = spec.get("selector")
    if group == GROUP_V1:
        # v1: a LabelSelector reduced to matchLabels.
        labels = sel.get("matchLabels") if isinstance(sel, dict) else None
        ports_raw = [p.get("number") if isinstance(p, dict) else None
                     for p in spec.get("targetPorts") or []]
        picker = spec.get("endpointPickerRef") or {}
    else:
        # v1alpha2: the selector is the label map itself, one target port.
        labels = sel
        ports_raw = [spec.get("targetPortNumber")]
        picker = spec.get("extensionRef") or {}
    if not isinstance(labels, dict) or not labels:
        raise InvalidObject(f"InferencePool {ns}/{name}: empty or malformed selector")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise InvalidObject(f"InferencePool {ns}/{name}: selector labels must be strings")
    ports: list[int] = []
    for p in ports_raw:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 < p < 65536 or p in ports:
            raise InvalidObject(f"InferencePool {ns}/{name}: bad target port {p!r}")
        ports.append(p)
    if not ports:
        raise InvalidObject(f"InferencePool {ns}/{name}: no target ports")
    return PoolSpec(
        name=name,
        namespace=ns,
        selector=dict(labels),
        target_ports=tuple(ports),
        app_protocol=str(spec.get("appProtocol") or "http"),
        endpoint_picker=dict(picker) if isinstance(picker, dict) else {},
        resource_version=str(_meta(obj).get("resourceVersion") or ""),
    )


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """Ready condition True, an IP, and not being deleted."""
    if _meta(pod).get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if not status.get("podIP"):
        return False
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def active_ports(pod: Mapping[str, Any]) -> set[int] | None:
    """The ports named by the active-ports annotation, or None when it is absent."""
    raw = (_meta(pod).get("annotations") or {}).get(ACTIVE_PORTS_ANNOTATION)
    if raw is None:
        return None
    out: set[int] = set()
    for part in str(raw).split(","):
        part = part.strip()
        if part.isdigit():
            out.add(int(part))
    return out


def pod_endpoints(
    pod: Mapping[str, Any], selector: Mapping[str, str], target_ports: tuple[int, ...]
) -> list[Endpoint]:
    """One endpoint per (ready, selected) pod and target port, named `<pod>-rank-<i>`.

    The rank is the port's index in the pool's target ports, so a name keeps meaning the
    same port while the active-ports annotation switches ports on and off.
    """
    meta = _meta(pod)
    labels = meta.get("labels") or {}
    if not selector_matches(selector, labels) or not pod_is_ready(pod):
        return []
    ip = str(pod["status"]["podIP"])
    active = active_ports(pod)
    name = str(meta.get("name"))
    return [
        Endpoint(name=f"{name}-rank-{i}", address=ip, port=port, labels=dict(labels))
        for i, port in enumerate(target_ports)
        if active is None or port in active
    ]


def references_pool(obj: Mapping[str, Any], pool: str, pool_group: str) -> bool:
    """Whether an objective, rewrite or model names this pool in `spec.poolRef`.

    An unset poolRef group means the v1 group; a legacy InferenceModel used the x-k8s
    group by default, so either group is accepted when the name matches and the group is
    one of the two inference groups.
    """
    ref = (obj.get("spec") or {}).get("poolRef")
    if not isinstance(ref, dict) or ref.get("name") != pool:
        return False
    kind = ref.get("kind") or "InferencePool"
    group = ref.get("group")
    if kind != "InferencePool":
        return False
    if group in (None, ""):
        return True
    return group in (pool_group, GROUP_V1, GROUP_X)
