"""One routing strategy's stack: a simulated fleet, optionally the EPP, and Envoy.

Every process runs on 127.0.0.1 on free ports and is stopped by `Stack.stop()`. The
fleet binds port 0; the EPP and Envoy are started again on new ports when another process
took one of theirs before they bound it (`tests.support.retry_port_taken`).
Strategies:

- `round-robin`: Envoy alone, a STATIC cluster of the pods with ROUND_ROBIN (what a
  Kubernetes Service in front of the pods amounts to); no ext_proc filter.
- `random`: the same with Envoy's RANDOM lb_policy (not the EPP's random-picker, so that
  neither baseline pays for the EPP).
- `oracle`: Envoy -> the oracle router inside the fleet's process (oracle.py), which reads
  every engine's true cache and queue and enqueues in the same step: the yardstick. An
  EPP scrapes the fleet during its runs too (routing nothing), so that the simulator
  bears the same /metrics rendering load as in the EPP strategies' runs.
- EPP strategies: Envoy from `epp envoy-config`'s builder (ext_proc + ORIGINAL_DST), the
  EPP with an EndpointPickerConfig (`None` = the built-in default profile).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from epp.scheduling.upstream import upstream_default_config_text
from epp.sim.config import SimConfig
from tests.support import EnvoyProcess, EppProcess, start_envoy, start_epp

ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TOKENIZER_DIR = Path(tempfile.gettempdir()) / "epp-bench-tinytok"
"""The project's tiny tokenizer (epp.sim.tinytok), for shapes whose pods tokenize."""


def ensure_tokenizer() -> Path:
    from epp.sim import tinytok

    return tinytok.write(TOKENIZER_DIR)


TICKS = os.sysconf("SC_CLK_TCK")

_HEAD = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
"""


def profile(weights: dict[str, float], picker: str = "max-score-picker",
            params: dict[str, str] | None = None) -> str:
    """An EndpointPickerConfig with one profile of these scorer weights; `params` gives a
    type's `parameters` as flow-style YAML."""
    lines = [_HEAD + "plugins:"]
    for t in weights:
        lines.append(f"- type: {t}")
        if params and t in params:
            lines.append(f"  parameters: {params[t]}")
    lines.append(f"- type: {picker}")
    lines += ["schedulingProfiles:", "- name: default", "  plugins:"]
    for t, w in weights.items():
        lines += [f"  - pluginRef: {t}", f"    weight: {w:g}"]
    lines.append(f"  - pluginRef: {picker}")
    return "\n".join(lines) + "\n"


UPSTREAM_DEFAULT = upstream_default_config_text()


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str
    """'round-robin', 'random' (plain Envoy), 'oracle' (Envoy -> oracle.py) or 'epp'."""
    config: str | None = None
    """EndpointPickerConfig YAML for 'epp' (None: the default profile)."""
    inflight: bool = True
    """False runs the EPP with its in-flight accounting switched off (epp_proc.py)."""
    kv_events: bool = False
    """The EPP subscribes to the pods' KV-cache events (their ports go in endpoint labels)."""
    note: str = ""


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("round-robin", "round-robin", note="Envoy ROUND_ROBIN cluster, no EPP"),
    Strategy("random", "random", note="Envoy RANDOM cluster, no EPP"),
    Strategy("queue+kv", "epp",
             profile({"queue-scorer": 2, "kv-cache-utilization-scorer": 2}),
             note="EPP: queue-scorer 2, kv-cache-utilization-scorer 2"),
    Strategy("oracle", "oracle",
             note="least estimated completion time from the pods' true caches and queues"),
    Strategy("default", "epp", None,
             note="EPP default: queue 2, kv 2, prefix 3, lora 1 (scaled queue, "
                  "load-aware prefix)"),
    Strategy("default-upstream", "epp", UPSTREAM_DEFAULT,
             note="the default weights with upstream's formulas: min-max queue, "
                  "load-blind prefix (the EPP's default before issue 13)"),
    Strategy("prefix-heavy", "epp",
             profile({"queue-scorer": 2, "kv-cache-utilization-scorer": 2,
                      "prefix-cache-scorer": 6, "lora-affinity-scorer": 1}),
             note="EPP: queue 2, kv 2, prefix 6, lora 1"),
    Strategy("precise", "epp",
             profile({"queue-scorer": 2, "kv-cache-utilization-scorer": 2,
                      "precise-prefix-cache-scorer": 3, "lora-affinity-scorer": 1},
                     params={"precise-prefix-cache-scorer":
                             f'{{blockSize: 16, tokenizers: {{"{MODEL}": "{TOKENIZER_DIR}"}}}}'}),
             kv_events=True,
             note="EPP default with precise-prefix-cache-scorer (KV events) for prefix-cache-scorer"),
    Strategy("default-no-inflight", "epp", None, inflight=False,
             note="EPP default profile, in-flight accounting off"),
    Strategy("queue+kv-no-inflight", "epp",
             profile({"queue-scorer": 2, "kv-cache-utilization-scorer": 2}), inflight=False,
             note="EPP queue 2, kv 2, in-flight accounting off"),
)}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and of its reaped children)."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = f[3] + f[4]
    return sum(f) - idle, sum(f)


class Fleet:
    """benchmarks.routing.fleet_proc in a child process."""

    def __init__(self, configs: list[SimConfig], oracle: bool = False) -> None:
        with tempfile.NamedTemporaryFile("w", prefix="fleet-", suffix=".json",
                                         delete=False) as f:
            json.dump([dict(asdict(c), lora_modules=dict(c.lora_modules)) for c in configs], f)
        self._cfg_path = f.name
        self.p = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.routing.fleet_proc", self._cfg_path,
             *(["--oracle"] if oracle else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True)
        line = self.p.stdout.readline() if self.p.stdout else ""
        if not line:
            self.stop()
            raise RuntimeError("simulated fleet did not start")
        info = json.loads(line)
        self.ports: list[int] = info["ports"]
        self.kv_events: list[list[int] | None] = info.get("kv_events") or [None] * len(self.ports)
        self.oracle_port: int | None = info.get("oracle")

    @property
    def hostports(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def stats(self) -> list[dict[str, Any]]:
        assert self.p.stdin and self.p.stdout
        self.p.stdin.write("stats\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def prefix_counters(self) -> tuple[float, float]:
        """(queries, hits) summed over the fleet, read from the /metrics pages."""
        q = h = 0.0
        for hp in self.hostports:
            with urllib.request.urlopen(f"http://{hp}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("vllm:prefix_cache_queries_total"):
                        q += float(line.rsplit(" ", 1)[1])
                    elif line.startswith("vllm:prefix_cache_hits_total"):
                        h += float(line.rsplit(" ", 1)[1])
        return q, h

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                if self.p.stdin:
                    self.p.stdin.write("quit\n")
                    self.p.stdin.flush()
                self.p.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.p.terminate()
                self.p.wait(5)
        Path(self._cfg_path).unlink(missing_ok=True)


def _plain_cluster(hostports: list[str], lb_policy: str):
    def patch(cfg: dict[str, Any]) -> None:
        hcm = cfg["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
        hcm["httpFilters"] = [f for f in hcm["httpFilters"]
                              if f["name"] != "envoy.filters.http.ext_proc"]
        clusters = cfg["staticResources"]["clusters"]
        eps = [{"endpoint": {"address": {"socketAddress": {
            "address": hp.rsplit(":", 1)[0], "portValue": int(hp.rsplit(":", 1)[1])}}}}
            for hp in hostports]
        for i, c in enumerate(clusters):
            if c["name"] == "model-servers":
                clusters[i] = {"name": "model-servers", "type": "STATIC",
                               "connectTimeout": "5s", "lbPolicy": lb_policy,
                               "loadAssignment": {"clusterName": "model-servers",
                                                  "endpoints": [{"lbEndpoints": eps}]}}
    return patch


class Stack:
    """Fleet + (EPP) + Envoy for one strategy; `url` is where the client sends."""

    def __init__(self, strategy: Strategy, sims: list[SimConfig],
                 refresh_interval: float = 0.05, epp_replicas: int = 1) -> None:
        """`epp_replicas` > 1: that many EPPs, each on its own (no state sync), with Envoy
        spreading the requests over them round robin."""
        self.strategy = strategy
        self.epp: EppProcess | None = None
        self.more_epps: list[EppProcess] = []
        self.envoy: EnvoyProcess | None = None
        self.fleet = Fleet(sims, oracle=strategy.kind == "oracle")
        try:
            if strategy.kind in ("epp", "oracle"):
                args = ["--refresh-metrics-interval", f"{refresh_interval}s", "-v", "-1"]
                if strategy.config is not None:
                    args += ["--config-text", strategy.config]
                # The oracle's runs start an EPP too, unused for routing: its scrapes cost
                # the simulator's process CPU (rendering /metrics), which slows the
                # simulated engines, and the yardstick must bear the same load.
                endpoints: str | None = ",".join(self.fleet.hostports)
                if strategy.kv_events:
                    args += ["--endpoints-file", self._endpoints_file()]
                    endpoints = None
                self.epp = _start_epp(args, endpoints, strategy.inflight)
                if strategy.kind == "epp":
                    for _ in range(epp_replicas - 1):
                        self.more_epps.append(_start_epp(args, endpoints, strategy.inflight))
            if strategy.kind == "epp":
                assert self.epp is not None
                self.envoy = start_envoy(self.epp.grpc_port,
                                         more_epps=[e.grpc_port for e in self.more_epps])
            elif strategy.kind == "oracle":
                self.envoy = start_envoy(1, patch=_plain_cluster(
                    [f"127.0.0.1:{self.fleet.oracle_port}"], "ROUND_ROBIN"))
            else:
                lb = {"round-robin": "ROUND_ROBIN", "random": "RANDOM"}[strategy.kind]
                self.envoy = start_envoy(1, patch=_plain_cluster(self.fleet.hostports, lb))
        except BaseException:
            self.stop()
            raise

    def _endpoints_file(self) -> str:
        """The pods with their KV-event ports as labels."""
        eps = []
        for i, (port, kv) in enumerate(zip(self.fleet.ports, self.fleet.kv_events)):
            if kv is None:
                raise RuntimeError("strategy needs KV events but the pods publish none")
            eps.append({"name": f"sim-{i}", "address": "127.0.0.1", "port": port,
                        "labels": {"kv-events.epp/port": str(kv[0]),
                                   "kv-events.epp/replay-port": str(kv[1] or 0)}})
        with tempfile.NamedTemporaryFile("w", prefix="endpoints-", suffix=".json",
                                         delete=False) as f:
            json.dump(eps, f)  # JSON is YAML
        self._tmp = f.name
        return f.name

    @property
    def url(self) -> str:
        assert self.envoy is not None
        return self.envoy.url + "/v1/completions"

    def pids(self) -> dict[str, int]:
        out = {"sim": self.fleet.p.pid, "client": os.getpid()}
        if self.envoy:
            out["envoy"] = self.envoy.proc.p.pid
        if self.epp:
            out["epp"] = self.epp.proc.p.pid
        for i, e in enumerate(self.more_epps):
            out[f"epp{i + 2}"] = e.proc.p.pid
        return out

    def cpu(self) -> dict[str, float]:
        return {k: cpu_seconds(p) for k, p in self.pids().items()}

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.proc.stop()
        for e in [self.epp, *self.more_epps]:
            if e is not None:
                e.proc.stop()
        self.fleet.stop()
        tmp = getattr(self, "_tmp", None)
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def _start_epp(args: list[str], endpoints: str | None, inflight: bool) -> EppProcess:
    if inflight:
        return start_epp(*args, endpoints=endpoints)
    # The same EPP with in-flight accounting off, through the ablation launcher.
    epp = start_epp(*args, endpoints=endpoints, module="benchmarks.routing.epp_proc")
    time.sleep(0.3)
    return epp
