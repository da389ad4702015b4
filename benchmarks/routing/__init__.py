"""Routing-quality benchmark: workloads, a replay client, and the stacks they run against.

`workload` builds deterministic request schedules (shared-prefix and multi-LoRA shapes
with Poisson arrivals); `client` replays one through an HTTP endpoint and measures
TTFT, latency and throughput; `stack` starts a simulated fleet, the EPP and Envoy for
one routing strategy; `report` turns results into tables and a plot.
"""
