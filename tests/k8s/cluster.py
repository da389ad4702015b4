"""A real etcd + kube-apiserver on 127.0.0.1 for the `k8s` tests, plus small helpers.

There is no kubelet, scheduler or controller-manager: pods stay where the tests put them,
and the tests play the kubelet by writing pod IP, phase and Ready through the status
subresource. Binaries come from tests/k8s/build_apiserver.sh (cached outside the repo).

Server settings chosen for the tests:
- a self-signed CA and serving cert (made with `cryptography`), an admin bearer token (system:masters),
  RBAC authorization, and service-account tokens (TokenRequest) for the EPP, so the EPP
  under test runs with exactly the permissions that deploy/kubernetes grants it;
- `--etcd-compaction-interval=2s` and the pods watch cache off (`pods#0`), so a watch that
  resumes from an old resourceVersion reaches etcd and gets 410 Gone once compacted;
- the ServiceAccount admission plugin off (no controller creates `default` accounts).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
ADMIN_TOKEN = "epp-test-admin-token"


def binaries(with_helm: bool = False) -> tuple[Path, ...] | None:
    """(kube-apiserver, etcd[, helm]) from $EPP_K8S_BIN or the build script's cache."""
    root = Path(os.environ.get("EPP_K8S_BIN")
                or Path(os.environ.get("EPP_K8S_CACHE", Path.home() / ".cache" / "epp-k8s")) / "bin")
    names = ("kube-apiserver", "etcd") + (("helm",) if with_helm else ())
    paths = tuple(root / n for n in names)
    return paths if all(p.is_file() for p in paths) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(d: Path) -> None:
    """A CA, a serving cert for 127.0.0.1/localhost signed by it, and the service-account
    signing key pair, as PEM files (ca.crt, apiserver.crt/.key, sa.key/.pub)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("epp-test-ca")).issuer_name(name("epp-test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("kube-apiserver")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "apiserver.key").write_bytes(key_pem(key))
    (d / "sa.key").write_bytes(key_pem(sa))
    (d / "sa.pub").write_bytes(sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


@dataclass
class Cluster:
    """etcd and kube-apiserver processes sharing one temporary directory."""

    apiserver_bin: Path
    etcd_bin: Path
    workdir: Path
    etcd_port: int = field(default_factory=free_port)
    etcd_peer_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    compaction_interval: str = "2s"
    etcd: subprocess.Popen | None = None
    apiserver: subprocess.Popen | None = None
    start_seconds: list[float] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> str:
        return str(self.workdir / "ca.crt")

    # -- processes -----------------------------------------------------------------

    def start(self) -> None:
        make_certs(self.workdir)
        (self.workdir / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin,"system:masters"\n')
        self.start_etcd()
        self.start_apiserver()

    def start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        self.etcd = subprocess.Popen(
            [str(self.etcd_bin), "--name", "default", "--data-dir", str(self.workdir / "etcd"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"default={peer}", "--log-level", "warn",
             "--quota-backend-bytes", str(512 * 1024 * 1024)],
            stdout=open(self.workdir / "etcd.log", "ab"), stderr=subprocess.STDOUT,
        )

    def start_apiserver(self, timeout: float = 120.0) -> None:
        d = self.workdir
        t0 = time.monotonic()
        self.apiserver = subprocess.Popen(
            [str(self.apiserver_bin),
             "--etcd-servers", f"http://127.0.0.1:{self.etcd_port}",
             "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
             "--secure-port", str(self.port),
             "--tls-cert-file", str(d / "apiserver.crt"),
             "--tls-private-key-file", str(d / "apiserver.key"),
             "--cert-dir", str(d / "certs"),
             "--token-auth-file", str(d / "tokens.csv"),
             "--authorization-mode", "RBAC",
             "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
             "--service-account-key-file", str(d / "sa.pub"),
             "--service-account-signing-key-file", str(d / "sa.key"),
             "--service-cluster-ip-range", "10.96.0.0/24",
             "--disable-admission-plugins", "ServiceAccount",
             "--etcd-compaction-interval", self.compaction_interval,
             "--watch-cache-sizes", "pods#0",
             "--enable-priority-and-fairness=false",
             "--profiling=false", "--v=1"],
            stdout=open(d / "apiserver.log", "ab"), stderr=subprocess.STDOUT,
        )
        self.wait_ready(timeout)
        self.start_seconds.append(time.monotonic() - t0)

    def wait_ready(self, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=self.ca)
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.apiserver is not None and self.apiserver.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited: {self.log_tail()}")
            req = urllib.request.Request(f"{self.url}/readyz",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.25)
        raise TimeoutError(f"kube-apiserver not ready after {timeout}s ({last}): {self.log_tail()}")

    def stop_apiserver(self) -> None:
        _terminate(self.apiserver)
        self.apiserver = None

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    def stop(self) -> None:
        _terminate(self.apiserver)
        _terminate(self.etcd)
        if os.environ.get("EPP_K8S_KEEP") != "1":  # keep logs and etcd data for debugging
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = (self.workdir / "apiserver.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    # -- clients -------------------------------------------------------------------

    def admin(self) -> Any:
        """An ApiClient with the admin token."""
        return self.client_for(ADMIN_TOKEN)

    def client_for(self, token: str, url: str | None = None) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = url or self.url
        cfg.ssl_ca_cert = self.ca
        cfg.api_key = {"authorization": token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)

    def kubeconfig(self, token: str, url: str | None = None) -> str:
        """Write a kubeconfig for `token` (at `url`, default the API server) and return its path."""
        path = Path(tempfile.mkstemp(prefix="kubeconfig-", dir=self.workdir)[1])
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": url or self.url,
                                                   "certificate-authority": self.ca}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
        }))
        return str(path)


def _terminate(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def start_cluster() -> Cluster:
    found = binaries()
    if found is None:
        raise RuntimeError("kube-apiserver/etcd not built: run tests/k8s/build_apiserver.sh")
    c = Cluster(found[0], found[1], Path(tempfile.mkdtemp(prefix="epp-k8s-")))
    try:
        c.start()
    except BaseException:
        c.stop()
        raise
    return c


# -- applying manifests ------------------------------------------------------------

# kind -> (api path prefix, plural, namespaced). Only the kinds our manifests use.
_CORE = {"Namespace": ("namespaces", False), "ServiceAccount": ("serviceaccounts", True),
         "Secret": ("secrets", True), "Service": ("services", True),
         "ConfigMap": ("configmaps", True), "Pod": ("pods", True)}
_PLURALS = {"Deployment": "deployments", "Role": "roles", "RoleBinding": "rolebindings",
            "ClusterRole": "clusterroles", "ClusterRoleBinding": "clusterrolebindings",
            "CustomResourceDefinition": "customresourcedefinitions",
            "InferencePool": "inferencepools", "InferenceObjective": "inferenceobjectives",
            "InferenceModelRewrite": "inferencemodelrewrites",
            "InferenceModel": "inferencemodels", "Lease": "leases"}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def resource_path(doc: dict[str, Any], namespace: str | None) -> str:
    kind, api = doc["kind"], doc["apiVersion"]
    if kind in _CORE:
        plural, namespaced = _CORE[kind]
        base = "/api/v1"
    else:
        plural, namespaced = _PLURALS[kind], kind not in _CLUSTER_SCOPED
        base = f"/apis/{api}"
    ns = doc.get("metadata", {}).get("namespace") or namespace
    if namespaced:
        if not ns:
            raise ValueError(f"{kind} {doc['metadata'].get('name')} needs a namespace")
        return f"{base}/namespaces/{ns}/{plural}"
    return f"{base}/{plural}"


def load_docs(*paths: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for p in paths:
        docs.extend(d for d in yaml.safe_load_all(p.read_text()) if d)
    return docs


def apply(api: Any, docs: list[dict[str, Any]], namespace: str | None = None) -> None:
    """Create each object (or replace it if it exists), like `kubectl apply -n namespace`.

    Namespaced objects without a namespace get `namespace`; so do ServiceAccount subjects
    of (Cluster)RoleBindings that name none.
    """
    for doc in docs:
        doc = json.loads(json.dumps(doc))
        if namespace:
            for s in doc.get("subjects") or []:
                if s.get("kind") == "ServiceAccount" and not s.get("namespace"):
                    s["namespace"] = namespace
        path = resource_path(doc, namespace)
        name = doc["metadata"]["name"]
        for attempt in range(60):  # a fresh CRD takes a moment to be served
            status, body = call(api, "POST", path, doc)
            if status == 409:
                current = call(api, "GET", f"{path}/{name}")[1]
                doc["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                status, body = call(api, "PUT", f"{path}/{name}", doc)
            if status == 404 and doc["kind"] not in _CORE:
                time.sleep(0.25)
                continue
            break
        if status >= 300:
            raise RuntimeError(f"apply {doc['kind']} {name}: HTTP {status}: {body}")


def call(api: Any, method: str, path: str, body: Any = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    """One raw request with the client's bearer token; returns (status, decoded JSON)."""
    cfg = api.configuration
    headers = {"Accept": "application/json", "Content-Type": content_type}
    auth = cfg.auth_settings().get("BearerToken")
    if auth:
        headers["Authorization"] = auth["value"]
    data = json.dumps(body).encode() if body is not None else None
    r = api.rest_client.pool_manager.request(method, cfg.host + path, body=data,
                                             headers=headers, timeout=30)
    try:
        decoded = json.loads(r.data) if r.data else None
    except ValueError:
        decoded = r.data
    return r.status, decoded
