"""A vLLM-compatible model-server simulator, for tests, benchmarks and the demo.

It speaks vLLM's OpenAI-compatible HTTP API and `/metrics` exposition, and models what
makes routing matter: continuous batching, a waiting queue, a paged KV cache with
prefix caching, LoRA slots with swap-in delays. Token counts are approximate (about
4 characters per token); output text is made up. The EPP itself never imports this.

Python API:

    from epp.sim import SimConfig, start_fleet
    fleet = await start_fleet([SimConfig(name="pod-a", port=0, time_scale=20)])
    fleet.urls; await fleet.stop()

Command line: `epp-sim --help` (module `epp.sim.cli`).
"""

from epp.sim.config import ConfigError, SimConfig, fleet_configs, load_fleet_file
from epp.sim.engine import Engine, QueueFull, Sequence
from epp.sim.fleet import Fleet, start_fleet
from epp.sim.server import REPLICA_HEADER, Replica

__all__ = [
    "REPLICA_HEADER",
    "ConfigError",
    "Engine",
    "Fleet",
    "QueueFull",
    "Replica",
    "Sequence",
    "SimConfig",
    "fleet_configs",
    "load_fleet_file",
    "start_fleet",
]
