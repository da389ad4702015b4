"""The simulator's HTTP API, used the way a client of vLLM uses it."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import replace

import aiohttp
import pytest

from epp.sim import REPLICA_HEADER, SimConfig, start_fleet
from tests.sim.conftest import BASE, StartSim, wait_until


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    body = (await resp.read()).decode()
    events = [block for block in body.split("\n\n") if block.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


async def test_completion_echoes_model_and_reports_usage(start_sim: StartSim, http):
    fleet = await start_sim(name="pod-a", lora_modules={"food-review": "/a/food"},
                            time_scale=20)
    body = {"model": "food-review", "prompt": "Write as if you were a critic: San Francisco",
            "max_tokens": 7, "temperature": 0}
    async with http.post(fleet.urls[0] + "/v1/completions", json=body,
                         headers={"x-request-id": "r-1"}) as r:
        assert r.status == 200
        assert r.headers[REPLICA_HEADER] == "pod-a"
        assert r.headers["x-request-id"] == "r-1"
        out = await r.json()
    assert out["object"] == "text_completion"
    assert out["model"] == "food-review"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["choices"][0]["text"]
    # 44 characters at ~4 characters per token
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                            "prompt_tokens_details": {"cached_tokens": 0}}


async def test_chat_completion_without_max_tokens_stops_on_its_own(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=20, default_max_tokens=5)
    body = {"model": BASE, "messages": [{"role": "user", "content": "hello"}]}
    async with http.post(fleet.urls[0] + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        out = await r.json()
    assert out["object"] == "chat.completion"
    assert out["model"] == BASE
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    assert 1 <= out["usage"]["completion_tokens"] <= 5


async def test_streamed_chat_ends_with_usage_and_done(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=20)
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(fleet.urls[0] + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == BASE for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]][1:]
    assert len(tokens) == 4
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, None, "length"]
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 4


async def test_streamed_completion_without_include_usage_has_no_usage_chunk(
        start_sim: StartSim, http):
    fleet = await start_sim(time_scale=20)
    body = {"model": BASE, "prompt": "once upon a time", "max_tokens": 3, "stream": True}
    async with http.post(fleet.urls[0] + "/v1/completions", json=body) as r:
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 3
    assert all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks)


async def test_models_and_runtime_lora_loading(start_sim: StartSim, http):
    fleet = await start_sim(lora_modules={"food-review": "/a/food"})
    url = fleet.urls[0]

    async def model_ids() -> list[str]:
        async with http.get(url + "/v1/models") as r:
            return [m["id"] for m in (await r.json())["data"]]

    assert await model_ids() == [BASE, "food-review"]
    async with http.post(url + "/v1/load_lora_adapter",
                         json={"lora_name": "cad-fabricator", "lora_path": "/a/cad"}) as r:
        assert r.status == 200
    assert await model_ids() == [BASE, "cad-fabricator", "food-review"]
    async with http.post(url + "/v1/load_lora_adapter",
                         json={"lora_name": "cad-fabricator", "lora_path": "/a/cad"}) as r:
        assert r.status == 400
    async with http.post(url + "/v1/unload_lora_adapter", json={"lora_name": "food-review"}) as r:
        assert r.status == 200
    async with http.post(url + "/v1/unload_lora_adapter", json={"lora_name": "food-review"}) as r:
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "NotFoundError"
    assert await model_ids() == [BASE, "cad-fabricator"]
    async with http.post(url + "/v1/completions",
                         json={"model": "food-review", "prompt": "x"}) as r:
        assert r.status == 404


async def test_errors_look_like_vllm_errors(start_sim: StartSim, http):
    fleet = await start_sim(max_model_len=64, num_gpu_blocks=8, block_size=16)
    url = fleet.urls[0] + "/v1/completions"
    cases = [
        (b'{"model": ', 400),  # malformed JSON
        (b'[1, 2]', 400),  # not an object
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
        (json.dumps({"model": BASE}).encode(), 400),  # no prompt
        (json.dumps({"model": BASE, "prompt": ""}).encode(), 400),
        (json.dumps({"model": BASE, "prompt": [1, 2**40]}).encode(), 400),  # not a token id
        (json.dumps({"model": BASE, "prompt": ["a", "b"]}).encode(), 400),  # batches of one only
        (json.dumps({"model": BASE, "prompt": "x", "max_tokens": -1}).encode(), 400),
        (json.dumps({"model": BASE, "prompt": "x", "stream": "yes"}).encode(), 400),
        (json.dumps({"model": BASE, "prompt": "x" * 400}).encode(), 400),  # > max_model_len
        (json.dumps({"model": BASE, "prompt": "x", "max_tokens": 100}).encode(), 400),
        (json.dumps({"model": BASE, "prompt": "x", "temperature": "warm"}).encode(), 400),
        (json.dumps({"model": BASE, "prompt": "x", "temperature": "-1"}).encode(), 400),
        (json.dumps({"model": BASE, "prompt": "x", "temperature": "inf"}).encode(), 400),
    ]
    for raw, status in cases:
        async with http.post(url, data=raw, headers={"Content-Type": "application/json"}) as r:
            assert r.status == status, raw
            err = (await r.json())["error"]
            assert err["code"] == status
            assert err["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
            assert err["message"]
            assert r.headers[REPLICA_HEADER] == fleet.replicas[0].name
    async with http.get(fleet.urls[0] + "/health") as r:
        assert r.status == 200
    async with http.get(fleet.urls[0] + "/v1/nothing-here") as r:
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "NotFoundError"


async def test_a_numeric_string_temperature_is_taken_as_vllm_takes_it(start_sim: StartSim, http):
    # The GKE guide's request sends "temperature": "0"; vLLM's pydantic model reads it as 0.0.
    fleet = await start_sim()
    async with http.post(fleet.urls[0] + "/v1/completions",
                         json={"model": BASE, "prompt": "x", "max_tokens": 2,
                               "temperature": "0"}) as r:
        assert r.status == 200, await r.text()


async def test_full_waiting_queue_answers_429(start_sim: StartSim, http):
    # One running slot and one waiting slot: the third concurrent request is refused.
    fleet = await start_sim(max_num_seqs=1, max_waiting=1, time_scale=5)
    url = fleet.urls[0] + "/v1/completions"

    async def send() -> int:
        async with http.post(url, json={"model": BASE, "prompt": "p", "max_tokens": 20}) as r:
            await r.read()
            return r.status

    first = asyncio.create_task(send())
    engine = fleet.replicas[0].engine
    await wait_until(lambda: engine.num_running == 1, "a running request")
    second = asyncio.create_task(send())
    await wait_until(lambda: engine.num_waiting == 1, "a waiting request")
    async with http.post(url, json={"model": BASE, "prompt": "p", "max_tokens": 20}) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == 429
    assert await first == 200
    assert await second == 200


async def test_fleet_replicas_are_independent(start_sim: StartSim, http):
    fleet = await start_sim(replicas=3, name="pod", time_scale=20)
    assert len(set(fleet.urls)) == 3
    for i, url in enumerate(fleet.urls):
        async with http.post(url + "/v1/completions",
                             json={"model": BASE, "prompt": "hello", "max_tokens": i + 1}) as r:
            assert r.headers[REPLICA_HEADER] == f"pod-{i}"
    served = [r.engine.stats.generation_tokens for r in fleet.replicas]
    assert served == [1, 2, 3]


async def test_stopping_a_fleet_ends_open_streams(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=1)
    body = {"model": BASE, "prompt": "p", "max_tokens": 1000, "stream": True}
    async with http.post(fleet.urls[0] + "/v1/completions", json=body) as r:
        await r.content.readuntil(b"\n\n")  # the first token arrived
        await fleet.stop()
        rest = (await r.read()).decode()
    assert '"finish_reason":"abort"' in rest
    assert fleet.replicas[0].engine.num_running == 0


async def test_a_client_that_hangs_up_frees_its_place_in_the_batch(start_sim: StartSim, http):
    fleet = await start_sim(time_scale=1)
    engine = fleet.replicas[0].engine
    body = {"model": BASE, "prompt": "p", "max_tokens": 1000}
    task = asyncio.create_task(http.post(fleet.urls[0] + "/v1/completions", json=body))
    await wait_until(lambda: engine.num_running >= 1, "a running request")
    task.cancel()  # closes the connection mid-request
    await wait_until(lambda: engine.num_running == 0, "the abort")
    assert engine.stats.finished["abort"] == 1
    assert engine.kv.usage == 0.0


async def test_a_fleet_that_cannot_listen_stops_what_it_started(start_sim: StartSim):
    taken = await start_sim()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    good = SimConfig(name="good", port=free)
    clash = replace(good, name="clash", port=taken.replicas[0].port)
    with pytest.raises(OSError):
        await start_fleet([good, clash])
    with socket.socket() as s:
        s.bind(("127.0.0.1", free))  # "good" was started, then stopped again
