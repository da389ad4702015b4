"""Fleet files and command-line flags of `epp-sim`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from epp.sim import ConfigError, SimConfig, fleet_configs, load_fleet_file
from epp.sim.cli import build_parser, configs_from_args

DEMO = Path(__file__).resolve().parents[2] / "epp" / "sim" / "fleet_demo.yaml"


def test_the_demo_fleet_has_two_adapter_pods_and_two_base_pods():
    configs = load_fleet_file(DEMO, base_port=8001)
    assert [c.port for c in configs] == [8001, 8002, 8003, 8004]
    assert {c.model for c in configs} == {"meta-llama/Llama-3.1-8B-Instruct"}
    with_adapters = [c for c in configs if c.lora_modules]
    assert len(with_adapters) == 2
    assert all(set(c.lora_modules) == {"food-review", "cad-fabricator"} for c in with_adapters)
    assert [c.lora_enabled for c in configs] == [True, True, False, False]
    assert len({c.seed for c in configs}) == 4  # independent replicas


def test_replica_entries_override_defaults_which_override_flags(tmp_path: Path):
    f = tmp_path / "fleet.yaml"
    f.write_text("defaults: {max-num-seqs: 8, time_scale: 2}\n"
                 "replicas:\n  - {name: a, max_num_seqs: 4}\n  - {name: b, port: 9100}\n")
    base = SimConfig(max_num_seqs=99, max_loras=3)
    a, b = fleet_configs(base, fleet_file=f, base_port=9000)
    assert (a.name, a.port, a.max_num_seqs, a.time_scale, a.max_loras) == ("a", 9000, 4, 2.0, 3)
    assert (b.name, b.port, b.max_num_seqs) == ("b", 9100, 8)


@pytest.mark.parametrize("text, message", [
    ("replicas: []", "non-empty list"),
    ("replicas: [{name: a, nonsense: 1}]", "unknown option"),
    ("replicas: [{name: a, max_num_seqs: many}]", "expected int"),
    ("replicas: [{name: a}, {name: a}]", "unique"),
    ("replicas: [{name: a, max_num_seqs: 0}]", "must be >= 1"),
    ("defaults: [1]\nreplicas: [{}]", "defaults must be a mapping"),
    ("replicas: [{port: 9000}, {port: 9000}]", "share a port"),
    ("{not yaml", "not valid YAML"),
])
def test_bad_fleet_files_are_rejected_with_a_reason(tmp_path: Path, text: str, message: str):
    f = tmp_path / "fleet.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_fleet_file(f)


def test_replicas_flag_makes_consecutive_ports_and_seeds():
    args = build_parser().parse_args(
        ["--replicas", "3", "--base-port", "8100", "--seed", "5", "--lora-modules",
         "food-review=/a/food", "cad-fabricator=/a/cad", "--max-loras", "2"])
    configs = configs_from_args(args)
    assert [(c.name, c.port, c.seed) for c in configs] == [
        ("sim-0", 8100, 5), ("sim-1", 8101, 6), ("sim-2", 8102, 7)]
    assert dict(configs[0].lora_modules) == {"food-review": "/a/food", "cad-fabricator": "/a/cad"}


async def test_epp_sim_command_serves_until_sigterm(tmp_path: Path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "epp.sim.cli", "--replicas", "2", "--base-port", "0",
        "--time-scale", "20", "--log-level", "WARNING",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        assert proc.stdout is not None and proc.stderr is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("epp-sim: ready"):
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, (await proc.stderr.read()).decode()
            lines.append(line.decode().strip())
        urls = [ln.split()[2] for ln in lines[:-1]]
        assert len(urls) == 2
        async with aiohttp.ClientSession() as s:
            for i, url in enumerate(urls):
                async with s.post(url + "/v1/completions",
                                  json={"model": "meta-llama/Llama-3.1-8B-Instruct",
                                        "prompt": "hi", "max_tokens": 2}) as r:
                    assert r.status == 200
                    assert r.headers["x-sim-replica"] == f"sim-{i}"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_bad_flags_exit_2_with_a_message():
    p = subprocess.run([sys.executable, "-m", "epp.sim.cli", "--max-num-seqs", "0"],
                       check=False, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "max_num_seqs must be >= 1" in p.stderr
