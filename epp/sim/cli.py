"""`epp-sim`: run one simulated vLLM server, or a fleet of them, until Ctrl-C.

Flags use vLLM's names where vLLM has the setting (`--max-num-seqs`, `--max-loras`,
`--lora-modules name=path ...`, `--block-size`, ...). Precedence for a fleet: flags give
the base, the fleet file's `defaults` override them, and each replica entry overrides
those. Once every replica listens, one line per replica and a final `ready` line are
printed to stdout, so scripts can wait for them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from epp.sim.config import ConfigError, SimConfig, fleet_configs, parse_lora_modules
from epp.sim.fleet import start_fleet

_D = SimConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp-sim",
        description="A vLLM-compatible model-server simulator (approximate tokens: "
                    "~4 characters each; made-up output text).")
    a = p.add_argument
    a("--host", default=_D.host, help="address to listen on (default %(default)s)")
    a("--port", type=int, default=_D.port, help="port of a single server (default %(default)s)")
    a("--replicas", type=int, default=1, help="number of servers in this process")
    a("--base-port", type=int, default=None,
      help="first port of a fleet; replica i listens on base-port + i (0 = any free port)")
    a("--fleet-config", default=None, metavar="YAML",
      help="per-replica options (see epp/sim/fleet_demo.yaml); sets the replica count")
    a("--model", default=_D.model, help="base model name (default %(default)s)")
    a("--lora-modules", nargs="*", default=[], metavar="NAME=PATH",
      help="LoRA adapters known at start")
    a("--enable-lora", action=argparse.BooleanOptionalAction, default=None,
      help="serve LoRA adapters (default: on when --lora-modules is given)")
    a("--max-loras", type=int, default=_D.max_loras, help="GPU slots for adapters")
    a("--lora-load-time", type=float, default=_D.lora_load_time,
      help="seconds to swap an adapter into a slot (default %(default)s)")
    a("--max-num-seqs", type=int, default=_D.max_num_seqs, help="max running requests")
    a("--max-num-batched-tokens", type=int, default=_D.max_num_batched_tokens,
      help="token budget of one engine step")
    a("--max-waiting", type=int, default=_D.max_waiting,
      help="waiting-queue capacity; beyond it requests get 429")
    a("--max-model-len", type=int, default=_D.max_model_len)
    a("--num-gpu-blocks", "--num-gpu-blocks-override", dest="num_gpu_blocks", type=int,
      default=_D.num_gpu_blocks, help="KV cache size in blocks")
    a("--block-size", type=int, default=_D.block_size, help="tokens per KV block")
    a("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
      default=_D.enable_prefix_caching)
    a("--step-time", type=float, default=_D.step_time,
      help="fixed seconds per engine step (default %(default)s)")
    a("--decode-time-per-seq", type=float, default=_D.decode_time_per_seq,
      help="extra step seconds per decoding request (default %(default)s)")
    a("--decode-time-per-kv-token", type=float, default=_D.decode_time_per_kv_token,
      help="extra step seconds per context token read in decode (default %(default)s)")
    a("--prefill-time-per-token", type=float, default=_D.prefill_time_per_token,
      help="step seconds per uncached prompt token (default %(default)s)")
    a("--default-max-tokens", type=int, default=_D.default_max_tokens,
      help="bound of the random output length when a request sets no max_tokens")
    a("--time-scale", type=float, default=_D.time_scale,
      help="simulated seconds per wall second (e.g. 10 runs 10x faster)")
    a("--seed", type=int, default=_D.seed, help="random seed (replica i uses seed + i)")
    a("--legacy-cache-metric", action="store_true",
      help="emit vllm:gpu_cache_usage_perc (older vLLM) instead of vllm:kv_cache_usage_perc")
    a("--tokenizer", default=None, metavar="DIR",
      help="directory with tokenizer.json (+ tokenizer_config.json): tokenize prompts as "
           "vLLM does (build a small one with `python -m epp.sim.tinytok DIR`)")
    a("--kv-events-port", type=int, default=None,
      help="publish KV-cache events on this ZeroMQ PUB port, like vLLM's --kv-events-config "
           "(0: any free port; needs --tokenizer; replica i uses port + 2i)")
    a("--kv-events-replay-port", type=int, default=None,
      help="ROUTER port replaying past event batches (default: events port + 1 when events are on)")
    a("--kv-events-connect", default=None, metavar="ADDR",
      help="connect the events PUB socket to ADDR (e.g. tcp://127.0.0.1:5557, where the EPP "
           "binds with kvEventsConfig.zmqEndpoint) instead of binding --kv-events-port; "
           "topic kv@<replica name>@<model>; needs --tokenizer")
    a("--log-level", default="INFO", help="logging level (default %(default)s)")
    return p


def _replay_port(args: argparse.Namespace) -> int | None:
    if args.kv_events_replay_port is not None:
        return int(args.kv_events_replay_port)
    if args.kv_events_port is None:
        return None
    return 0 if args.kv_events_port == 0 else args.kv_events_port + 1


def configs_from_args(args: argparse.Namespace) -> list[SimConfig]:
    """The replica configs the parsed flags describe (raises ConfigError)."""
    base = replace(
        _D, host=args.host, port=args.port, model=args.model,
        lora_modules=parse_lora_modules(args.lora_modules), enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        lora_load_time=args.lora_load_time, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
        max_model_len=args.max_model_len, num_gpu_blocks=args.num_gpu_blocks,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
        step_time=args.step_time, decode_time_per_seq=args.decode_time_per_seq,
        decode_time_per_kv_token=args.decode_time_per_kv_token,
        prefill_time_per_token=args.prefill_time_per_token,
        default_max_tokens=args.default_max_tokens, time_scale=args.time_scale,
        seed=args.seed, legacy_cache_metric=args.legacy_cache_metric,
        tokenizer=args.tokenizer, kv_events_port=args.kv_events_port,
        kv_events_replay_port=_replay_port(args), kv_events_connect=args.kv_events_connect)
    if args.fleet_config is None and args.replicas == 1 and args.base_port is None:
        return [base.validate()]
    return fleet_configs(base, args.replicas, args.base_port, args.fleet_config)


async def serve(configs: list[SimConfig]) -> None:
    """Run the fleet until SIGINT or SIGTERM, then stop it cleanly."""
    fleet = await start_fleet(configs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass
    try:
        for r in fleet.replicas:
            adapters = ",".join(sorted(r.adapters)) or "-"
            events = ""
            if r.kv_events is not None:
                where = r.kv_events.connect or r.kv_events.port
                events = f" kv-events={where} kv-events-replay={r.kv_events.replay_port}"
            print(f"epp-sim: {r.name} {r.url} model={r.cfg.model} adapters={adapters}{events}",
                  flush=True)
        print(f"epp-sim: ready ({len(fleet.replicas)} replicas)", flush=True)
        await stop.wait()
    finally:
        await fleet.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        configs = configs_from_args(args)
    except ConfigError as e:
        print(f"epp-sim: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(configs))
    except ConfigError as e:  # found when a replica is built (an unusable tokenizer)
        print(f"epp-sim: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # typically: the port is taken
        print(f"epp-sim: cannot listen: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
