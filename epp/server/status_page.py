"""`/debug/status` on the metrics port: the pool, the config and the last decisions on one
HTML page that refreshes itself (a meta refresh; no JavaScript).

The metrics server answers on its own threads, but the pool's state belongs to the event
loop (see epp.datastore), so the page hops there once to copy what it shows into plain
data (`collect`, a few microseconds per endpoint) and renders back on its thread. Every
string is clipped (epp.telemetry.records.clip) and the template autoescapes, so model,
adapter and endpoint names cannot inject markup.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import jinja2
import yaml

from epp import observability as obs
from epp.telemetry.records import DecisionRecord, clip

REFRESH_SECONDS = 2
_CONFIG_TEXT_LIMIT = 20_000


@dataclass(frozen=True, slots=True)
class EndpointRow:
    name: str
    address: str
    waiting: str
    running: str
    kv: str
    adapters: str
    waiting_adapters: str
    max_lora: str
    freshness: str
    stale: bool
    error: str
    in_flight: int
    picks_per_second: str


@dataclass(frozen=True, slots=True)
class StatusView:
    generated: str
    pool: str
    endpoints: tuple[EndpointRow, ...]
    saturation: str
    saturated: bool
    flow_control: bool
    flow_queues: tuple[tuple[str, str], ...]
    objectives: tuple[tuple[str, str, str], ...]
    config_text: str
    decisions: tuple[DecisionRecord, ...]
    refresh: int = REFRESH_SECONDS


def _num(v: float, fmt: str = "{:g}") -> str:
    return "–" if v is None or not math.isfinite(float(v)) else fmt.format(float(v))


def _names(names: Any) -> str:
    return clip(", ".join(sorted(clip(n, 80) for n in names)) or "–", 400)


class StatusSource:
    """Copies what the page shows out of the EPP's live objects; call on the event loop."""

    def __init__(self, *, datastore: Any, observer: Any, config: Any, objectives: Any = None,
                 inflight: Any = None, detector: Any = None, pool_name: str = "") -> None:
        self.datastore = datastore
        self.observer = observer
        self.config = config
        self.objectives = objectives
        self.inflight = inflight
        self.detector = detector
        self.pool_name = pool_name
        self._config_text = clip(yaml.safe_dump(getattr(config, "raw", None) or {},
                                                sort_keys=False), _CONFIG_TEXT_LIMIT)

    def collect(self) -> StatusView:
        snap = self.datastore.snapshot()
        now = time.monotonic()
        stale = snap.stale(now)
        open_by = self.inflight.open_by_endpoint() if self.inflight is not None else {}
        rates = self.observer.picks_per_second() if self.observer is not None else {}
        rows = []
        for i, ep in enumerate(snap.endpoints):
            age = now - float(snap.scraped_at[i])
            rows.append(EndpointRow(
                name=clip(ep.name), address=clip(ep.hostport),
                waiting=_num(snap.waiting[i]), running=_num(snap.running[i]),
                kv=_num(snap.kv_usage[i] * 100, "{:.0f}%"),
                adapters=_names(snap.active_adapters[i]),
                waiting_adapters=_names(snap.waiting_adapters[i]),
                max_lora=str(int(snap.max_lora[i])) if snap.max_lora[i] else "–",
                freshness="never" if not math.isfinite(age) else f"{age * 1000:.0f} ms ago",
                stale=bool(stale[i]), error=clip(snap.last_error[i] or ""),
                in_flight=int(open_by.get(ep.name, 0)),
                picks_per_second=f"{rates.get(ep.name, 0.0):.1f}"))
        sat = math.nan
        if self.detector is not None and len(snap):
            sat = float(self.detector.saturation(snap, None, now))
        gates = getattr(self.config, "feature_gates", frozenset())
        queues = tuple(
            (clip(s.labels.get("priority", "")), _num(s.value))
            for metric in obs.FLOW_QUEUE_SIZE.collect() for s in metric.samples)
        objs = []
        if self.objectives is not None:
            for o in self.objectives.objects():
                kind = type(o).__name__
                if hasattr(o, "rules"):
                    detail = "; ".join(
                        f"{', '.join(r.models) or '*'} → "
                        + ", ".join(f"{t.model} ({t.weight})" for t in r.targets)
                        for r in o.rules)
                elif hasattr(o, "model_name"):
                    detail = f"model {o.model_name}, priority {o.priority}"
                else:
                    detail = f"priority {o.priority}"
                objs.append((kind, clip(o.meta.key.name), clip(detail, 400)))
        decisions = tuple(self.observer.recent_decisions()) if self.observer is not None else ()
        return StatusView(
            generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            pool=clip(self.pool_name or "(standalone)"),
            endpoints=tuple(rows),
            saturation=_num(sat, "{:.2f}"), saturated=bool(sat >= 1.0),
            flow_control="flowControl" in gates,
            flow_queues=queues,
            objectives=tuple(objs),
            config_text=self._config_text,
            decisions=decisions,
        )


_ENV = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True)
_ENV.filters["clock"] = lambda t: time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}"
_TEMPLATE = _ENV.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{{ v.refresh }}">
<title>EPP status – {{ v.pool }}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse;margin-bottom:.5em} th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f1f1f1} td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.stale td{color:#999} .bad{color:#b00;font-weight:bold} .ok{color:#070}
.win{font-weight:bold} .muted{color:#777} pre{background:#f7f7f7;padding:.6em;max-height:22em;overflow:auto}
</style></head><body>
<h1>EPP status: pool {{ v.pool }}</h1>
<div class="muted">generated {{ v.generated }}; refreshes every {{ v.refresh }} s</div>

<h2>Pool</h2>
<table id="endpoints"><thead><tr><th>endpoint</th><th>address</th><th>queue</th><th>running</th>
<th>KV</th><th>adapters (waiting)</th><th>max LoRA</th><th>metrics</th><th>in flight</th><th>picks/s</th></tr></thead>
<tbody>
{% for e in v.endpoints %}
<tr class="endpoint{{ ' stale' if e.stale }}" data-endpoint="{{ e.name }}"><td>{{ e.name }}</td><td>{{ e.address }}</td>
<td class="n">{{ e.waiting }}</td><td class="n">{{ e.running }}</td><td class="n">{{ e.kv }}</td>
<td>{{ e.adapters }}{% if e.waiting_adapters != '–' %} <span class="muted">({{ e.waiting_adapters }})</span>{% endif %}</td>
<td class="n">{{ e.max_lora }}</td>
<td>{{ e.freshness }}{% if e.stale %} <span class="bad">stale</span>{% endif %}{% if e.error %}<br><span class="bad">{{ e.error }}</span>{% endif %}</td>
<td class="n">{{ e.in_flight }}</td><td class="n">{{ e.picks_per_second }}</td></tr>
{% else %}
<tr><td colspan="10" class="bad">no endpoints</td></tr>
{% endfor %}
</tbody></table>

<h2>Saturation and flow control</h2>
<p id="saturation">pool saturation {{ v.saturation }}:
{% if v.saturated %}<span class="bad">saturated</span>{% else %}<span class="ok">has room</span>{% endif %};
flow control {{ 'on' if v.flow_control else 'off' }}
{% for prio, n in v.flow_queues %}{% if loop.first %}; queued by priority: {% endif %}{{ prio }}: {{ n }}{{ ', ' if not loop.last }}{% endfor %}</p>

<h2>Last routing decisions</h2>
<table id="decisions"><thead><tr><th>time</th><th>request</th><th>model → target</th><th>objective / priority</th>
<th>picked</th><th>queue wait</th><th>schedule</th><th>candidates: total (weighted scores)</th></tr></thead>
<tbody>
{% for d in v.decisions %}
<tr class="decision"><td>{{ d.at | clock }}</td><td>{{ d.request_id }}</td><td>{{ d.model }}{% if d.target_model != d.model %} → {{ d.target_model }}{% endif %}</td>
<td>{{ d.objective or '–' }} / {{ d.priority }}</td><td class="win">{{ d.endpoint }}</td>
<td class="n">{{ '%.1f' % d.queue_ms }} ms</td><td class="n">{{ '%.0f' % d.schedule_us }} µs</td>
<td>{% for c in d.candidates %}<div class="{{ 'win' if c.endpoint == d.endpoint }}">{{ c.endpoint }}: {{ '%.2f' % c.total }}
<span class="muted">({% for name, s in c.scores %}{{ name | replace('-scorer', '') }} {{ '%.2f' % s }}{{ ', ' if not loop.last }}{% endfor %})</span></div>{% else %}<span class="muted">no explanation</span>{% endfor %}
{% for name, n in d.filters %}<div class="muted">filter {{ name }}: {{ n }} left</div>{% endfor %}</td></tr>
{% else %}
<tr><td colspan="8" class="muted">no decisions yet</td></tr>
{% endfor %}
</tbody></table>
<div class="muted">Sampled: at most one decision every 100 ms is explained and kept.</div>

<h2>Objectives and rewrites</h2>
<table id="objectives"><thead><tr><th>kind</th><th>name</th><th>what</th></tr></thead><tbody>
{% for kind, name, detail in v.objectives %}<tr><td>{{ kind }}</td><td>{{ name }}</td><td>{{ detail }}</td></tr>
{% else %}<tr><td colspan="3" class="muted">none</td></tr>{% endfor %}
</tbody></table>

<h2>Active configuration</h2>
<pre id="config">{{ v.config_text }}</pre>
</body></html>
""")


def render(view: StatusView) -> bytes:
    return _TEMPLATE.render(v=view).encode()


class StatusPage:
    """The page as the metrics server's threads ask for it."""

    def __init__(self, source: StatusSource, loop: asyncio.AbstractEventLoop,
                 timeout: float = 2.0) -> None:
        self.source = source
        self.loop = loop
        self.timeout = timeout

    def html(self) -> bytes:
        """Rendered page; raises TimeoutError when the event loop does not answer in time."""
        async def collect() -> StatusView:
            return self.source.collect()

        view = asyncio.run_coroutine_threadsafe(collect(), self.loop).result(self.timeout)
        return render(view)
