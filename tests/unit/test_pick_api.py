"""The Pick API over a real grpc.aio server on 127.0.0.1.

The director (the request pipeline) is another engineer's; here a small fake `route`
callable stands in for it and runs the real scheduler on a real datastore, so what is
tested is the servicer: request mapping, explanation encoding and error codes.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from epp.config import load_config
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.errors import EppError, ErrorCode
from epp.request import InferenceRequest
from epp.scheduling import Explanation, Scheduler, SchedulingRequest
from epp.server.pick_api import SERVICE_NAME, add_to_server
from epp.v1 import pick_pb2, pick_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Decision:
    endpoint: Endpoint
    target_model: str
    explanation: Explanation | None


class FakeDirector:
    """Stands in for epp.director: subset -> candidates -> real scheduler."""

    def __init__(self) -> None:
        self.ds = Datastore()
        self.ds.set_endpoints([Endpoint("pod-a", "10.2.0.1", 8000),
                               Endpoint("pod-b", "10.2.0.2", 8000)])
        now = time.monotonic()
        self.ds.update_metrics("pod-a", EndpointMetrics(waiting=5, kv_usage=0.5, scraped_at=now))
        self.ds.update_metrics("pod-b", EndpointMetrics(waiting=0, kv_usage=0.1, scraped_at=now))
        self.scheduler = Scheduler.from_config(load_config(None))
        self.seen: list[InferenceRequest] = []
        self.fail: EppError | Exception | None = None

    async def route(self, req: InferenceRequest, explain: bool) -> Decision:
        self.seen.append(req)
        if self.fail is not None:
            raise self.fail
        snap = self.ds.snapshot()
        cands = None
        if req.subset is not None:
            cands = np.array([snap.by_hostport[h] for h in req.subset if h in snap.by_hostport])
        res = self.scheduler.schedule(
            SchedulingRequest(req.request_id, req.model, req.prompt_text), snap, cands,
            explain=explain)
        return Decision(res.endpoint, req.model, res.explanation)


@pytest.fixture
async def api():
    director = FakeDirector()
    server = grpc.aio.server()
    add_to_server(server, director.route)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield director, pick_pb2_grpc.PickerStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def test_pick_with_model_and_prompt(api) -> None:
    director, stub = api
    resp = await stub.Pick(pick_pb2.PickRequest(model="llama", prompt="hello",
                                                headers={"X-Request-Id": "abc"}))
    assert (resp.endpoint, resp.endpoint_name, resp.target_model) == ("10.2.0.2:8000", "pod-b", "llama")
    assert resp.request_id == "abc"
    req = director.seen[-1]
    assert req.prompt_text == "hello" and req.headers["x-request-id"] == "abc"
    assert req.subset is None


async def test_pick_with_raw_chat_body_and_subset(api) -> None:
    director, stub = api
    body = b'{"model": "llama", "messages": [{"role": "user", "content": "hi"}]}'
    resp = await stub.Pick(pick_pb2.PickRequest(body=body, subset=["10.2.0.1:8000"]))
    assert resp.endpoint_name == "pod-a"  # the only candidate allowed
    req = director.seen[-1]
    assert req.path == "/v1/chat/completions" and req.subset == ("10.2.0.1:8000",)
    assert req.parsed is not None and req.parsed.model == "llama"


async def test_explain_returns_every_score(api) -> None:
    _, stub = api
    resp = await stub.Explain(pick_pb2.PickRequest(model="llama", prompt="hello"))
    assert resp.pick.endpoint_name == "pod-b"
    e = resp.explanation
    assert e.picked == "pod-b" and e.primary_profile == "default"
    (p,) = e.profiles
    assert list(p.candidates) == ["pod-a", "pod-b"]
    assert [s.name for s in p.scorers] == [
        "queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer", "lora-affinity-scorer"]
    by = {c.endpoint_name: c for c in p.scores}
    assert by["pod-b"].raw["queue-scorer"] == 1.0
    assert by["pod-a"].raw["queue-scorer"] == pytest.approx(1 - 5 / 32)  # docs/scoring.md
    assert by["pod-a"].weighted["kv-cache-utilization-scorer"] == pytest.approx(1.0)
    assert by["pod-b"].total == pytest.approx(2 * 1.0 + 2 * 0.9)
    assert by["pod-b"].endpoint == "10.2.0.2:8000"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (EppError(ErrorCode.NotFound, "no objective"), grpc.StatusCode.NOT_FOUND),
        (EppError(ErrorCode.ResourceExhausted, "shed"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (EppError(ErrorCode.ServiceUnavailable, "none"), grpc.StatusCode.UNAVAILABLE),
        (EppError(ErrorCode.Internal, "bug"), grpc.StatusCode.INTERNAL),
        (EppError(ErrorCode.PayloadTooLarge, "big"), grpc.StatusCode.INVALID_ARGUMENT),
        (RuntimeError("unexpected"), grpc.StatusCode.INTERNAL),
    ],
)
async def test_route_errors_map_to_grpc_status(api, error, status) -> None:
    director, stub = api
    director.fail = error
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Pick(pick_pb2.PickRequest(model="m", prompt="p"))
    assert e.value.code() == status
    assert e.value.details().startswith("inference error: ")


@pytest.mark.parametrize(
    "request_",
    [
        pick_pb2.PickRequest(prompt="no model"),
        pick_pb2.PickRequest(body=b"{not json"),
        pick_pb2.PickRequest(body=b'{"prompt": "x"}'),
        pick_pb2.PickRequest(body=b'{"model": "a", "prompt": "x"}', model="b"),
        pick_pb2.PickRequest(body=b'{"model": "a", "prompt": "x"}', prompt="both"),
        # valid JSON, but no UTF-8 string can carry it: it answered UNKNOWN (issue 12)
        pick_pb2.PickRequest(body=b'{"model": "bad\\ud800model", "prompt": "x"}'),
    ],
)
async def test_bad_requests_are_invalid_argument(api, request_) -> None:
    director, stub = api
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Explain(request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "BadRequest" in e.value.details()
    assert director.seen == []  # never reached the pipeline


async def test_no_endpoint_left_is_unavailable(api) -> None:
    _, stub = api
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Pick(pick_pb2.PickRequest(model="m", prompt="p", subset=["10.9.9.9:1"]))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_service_name() -> None:
    assert SERVICE_NAME == "epp.v1.Picker"


def _normalise(text: str) -> str:
    """Drop the lines that only name the generator's version."""
    text = re.sub(r"# Protobuf Python Version: .*\n", "", text)
    text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text)
    text = re.sub(r"GRPC_GENERATED_VERSION = .*\n", "", text)
    return text


def test_generated_stubs_match_the_proto(tmp_path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}",
         f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
         str(ROOT / "protos/epp/v1/pick.proto")],
        check=True, capture_output=True, timeout=60,
    )
    for name in ("pick_pb2.py", "pick_pb2.pyi", "pick_pb2_grpc.py"):
        fresh = (tmp_path / "epp/v1" / name).read_text()
        kept = (ROOT / "epp/v1" / name).read_text()
        assert _normalise(fresh) == _normalise(kept), (
            f"epp/v1/{name} is out of date: run `make protos`")
