"""The HTTP face of one simulated vLLM server (aiohttp), and `Replica`, which runs one.

Routes follow vLLM's OpenAI-compatible server: completions and chat completions
(plain JSON or SSE streams), `/v1/models`, `/health`, runtime LoRA loading and
`/metrics`. Errors use vLLM's JSON shape `{"error": {"message", "type", "param",
"code"}}` with its type names. Every response carries `x-sim-replica: <name>` so a test
or the demo can tell which server answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from typing import Any, ClassVar

from aiohttp import web

from epp.sim.config import SimConfig
from epp.sim.engine import Engine, QueueFull, Sequence
from epp.sim.kvpublisher import KVEventPublisher
from epp.sim.metrics import CONTENT_TYPE, SimMetrics
from epp.sim.tokens import Prompt, TextGenerator, chat_template, ids_prompt, text_prompt
from epp.tokenization import ModelTokenizer, TokenizerError

log = logging.getLogger(__name__)

REPLICA_HEADER = "x-sim-replica"
MAX_BODY_BYTES = 16 * 1024 * 1024


class ApiError(Exception):
    """An error answer in vLLM's format."""

    TYPES: ClassVar[dict[int, str]] = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError",
             500: "InternalServerError", 503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}
        return web.json_response(body, status=self.status)


def _lax_float(value: Any) -> Any:
    """A numeric string as its number, as vLLM's request model (pydantic, lax mode) takes
    `"temperature": "0"`; anything else unchanged, for the caller to judge."""
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


class Replica:
    """One simulated server: engine + metrics + HTTP app on its own port."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg.validate()
        self.adapters: dict[str, str] = dict(cfg.lora_modules)
        self.engine = Engine(cfg)
        self.metrics = SimMetrics(cfg, self.engine)
        self.engine.on_finish = self.metrics.on_finish
        self.engine.on_step = self.metrics.on_step
        self.engine.on_lora_change = self.metrics.lora_changed
        self._rng = random.Random(cfg.seed)
        self._created = int(time.time())
        self._runner: web.AppRunner | None = None
        self.port = cfg.port
        self.tokenizer: ModelTokenizer | None = None
        if cfg.tokenizer:
            try:
                self.tokenizer = ModelTokenizer(cfg.model, cfg.tokenizer)
            except TokenizerError as e:
                from epp.sim.config import ConfigError

                raise ConfigError(f"{cfg.name}: tokenizer: {e}") from None
        self.kv_events: KVEventPublisher | None = None
        if cfg.kv_events_port is not None or cfg.kv_events_connect:
            self.kv_events = KVEventPublisher(
                cfg.host, cfg.kv_events_port or 0, cfg.kv_events_replay_port,
                topic=f"kv@{cfg.name}@{cfg.model}", layout=cfg.kv_events_layout,
                connect=cfg.kv_events_connect)
            self.engine.kv.events = []
            self.engine.on_kv_events = self.kv_events.publish
        self.app = self._make_app()

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def url(self) -> str:
        host = self.cfg.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine loop and listen; `port` is the bound port afterwards."""
        if self.kv_events is not None:
            self.kv_events.start()
        self.engine.start()
        # handler_cancellation: a client that hangs up cancels its handler, which aborts
        # the request in the engine, as vLLM aborts requests of closed connections.
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            await self.engine.stop()
            if self.kv_events is not None:
                await self.kv_events.stop()
            raise
        self._runner = runner
        if runner.addresses:  # the bound port, which matters when port 0 was asked for
            self.port = int(runner.addresses[0][1])
        log.info("sim %s listening on %s (model %s, adapters %s)", self.name, self.url,
                 self.cfg.model, sorted(self.adapters) or "none")

    async def stop(self) -> None:
        await self.engine.stop()  # wakes every open stream with finish_reason=abort
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.kv_events is not None:
            await self.kv_events.stop()

    # -- app ------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/load_lora_adapter", self._load_lora)
        app.router.add_post("/v1/unload_lora_adapter", self._unload_lora)
        app.router.add_get("/metrics", self._metrics)
        app.on_response_prepare.append(self._stamp)
        return app

    async def _stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[REPLICA_HEADER] = self.name
        rid = request.headers.get("x-request-id")
        if rid:
            response.headers["x-request-id"] = rid

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            if e.status >= 500 or e.status == 429:
                log.warning("sim %s: %s %s -> %d %s", self.name, request.method,
                            request.path, e.status, e.message)
            else:
                log.info("sim %s: %s %s -> %d %s", self.name, request.method,
                         request.path, e.status, e.message)
            return e.response()
        except web.HTTPException as e:
            if e.status == 413:
                return ApiError(400, f"request body too large: {e.text}").response()
            if e.status in (404, 405):
                return ApiError(e.status if e.status == 404 else 400,
                                f"{request.method} {request.path}: {e.reason}").response()
            raise

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _models(self, request: web.Request) -> web.Response:
        base = self.cfg.model
        card = {"object": "model", "created": self._created, "owned_by": "vllm",
                "max_model_len": self.cfg.max_model_len}
        data = [dict(card, id=base, root=base, parent=None)]
        data += [dict(card, id=n, root=p, parent=base) for n, p in sorted(self.adapters.items())]
        return web.json_response({"object": "list", "data": data})

    async def _load_lora(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if not self.cfg.lora_enabled:
            raise _bad("LoRA is not enabled on this server (start it with --enable-lora).")
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise _bad("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.adapters or name == self.cfg.model:
            raise _bad(f"The lora adapter '{name}' has already been loaded.", "lora_name")
        self.adapters[name] = path
        log.info("sim %s: loaded adapter %s from %s", self.name, name, path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or not name:
            raise _bad("'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self.adapters:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        del self.adapters[name]
        self.engine.evict_adapter(name)
        log.info("sim %s: unloaded adapter %s", self.name, name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # -- generation ------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        model, adapter = self._resolve_model(body)
        prompt = self._completion_prompt(body.get("prompt"), adapter)
        return await self._generate(request, body, model, adapter, prompt, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        model, adapter = self._resolve_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad("each message must be an object with a string 'role'", "messages")
            c = m.get("content")
            if c is not None and not isinstance(c, (str, list)):
                raise _bad("message content must be a string or a list of parts", "messages")
        if self.tokenizer is not None and self.tokenizer.template is not None:
            try:
                text = self.tokenizer.render_chat(messages)
            except TokenizerError as e:
                raise _bad(str(e), "messages") from None
            prompt = ids_prompt(self._encode(text, False), self.cfg.block_size, adapter or "")
        elif self.tokenizer is not None:
            prompt = ids_prompt(self._encode(chat_template(messages), False), self.cfg.block_size,
                                adapter or "")
        else:
            prompt = text_prompt(chat_template(messages), self.cfg.block_size, adapter or "")
        return await self._generate(request, body, model, adapter, prompt, chat=True)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        assert self.tokenizer is not None
        try:
            return self.tokenizer.encode(text, add_special_tokens)
        except TokenizerError as e:
            raise _bad(str(e), "prompt") from None

    def _resolve_model(self, body: dict[str, Any]) -> tuple[str, str | None]:
        model = body.get("model", self.cfg.model)
        if model is None:
            model = self.cfg.model
        if not isinstance(model, str):
            raise _bad("'model' must be a string", "model")
        if model == self.cfg.model:
            return model, None
        if model in self.adapters:
            return model, model
        raise ApiError(404, f"The model `{model}` does not exist.", "model")

    def _completion_prompt(self, p: Any, adapter: str | None) -> Prompt:
        salt = adapter or ""
        bs = self.cfg.block_size
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if p == "" or p == []:
            raise _bad("The prompt cannot be empty.", "prompt")
        if isinstance(p, str):
            if self.tokenizer is not None:
                return ids_prompt(self._encode(p, True), bs, salt)
            return text_prompt(p, bs, salt)
        if isinstance(p, list) and p and all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in p):
            return ids_prompt(p, bs, salt)
        if p is None:
            raise _bad("'prompt' is required", "prompt")
        if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
            raise _bad("the simulator serves one prompt per request", "prompt")
        raise _bad("'prompt' must be a string, a list of token ids, or a list with one of "
                   "those", "prompt")

    async def _generate(self, request: web.Request, body: dict[str, Any], model: str,
                        adapter: str | None, prompt: Prompt, chat: bool) -> web.StreamResponse:
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean", "stream")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        include_usage = bool(opts and opts.get("include_usage"))
        n = body.get("n", 1)
        if n not in (None, 1):
            raise _bad("the simulator supports only n=1", "n")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
            else "max_tokens"
        max_tokens = body.get(key)
        if max_tokens is not None and (not isinstance(max_tokens, int)
                                       or isinstance(max_tokens, bool) or max_tokens < 1):
            raise _bad(f"'{key}' must be a positive integer", key)
        temperature = _lax_float(body.get("temperature"))
        if temperature is not None and (isinstance(temperature, bool)
                                        or not isinstance(temperature, (int, float))
                                        or not 0 <= temperature < math.inf):
            raise _bad("'temperature' must be a non-negative number", "temperature")
        limit = self.cfg.max_model_len
        room = limit - prompt.num_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            want = prompt.num_tokens + (max_tokens or 1)
            raise _bad(f"This model's maximum context length is {limit} tokens. However, you "
                       f"requested {want} tokens ({prompt.num_tokens} in the messages, "
                       f"{max_tokens or 1} in the completion). Please reduce the length of "
                       f"the messages or completion.", key)
        if max_tokens is None:  # no limit given: the "model" stops on its own
            target, reason = min(self._rng.randint(1, self.cfg.default_max_tokens), room), "stop"
        else:
            target, reason = max_tokens, "length"
        seq = Sequence(request_id=uuid.uuid4().hex, prompt=prompt, max_tokens=target,
                       adapter=adapter, finish_reason_at_end=reason,
                       max_tokens_requested=max_tokens)
        try:
            self.engine.submit(seq)
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        text = TextGenerator(self._rng.getrandbits(63))
        prefix = "chatcmpl-" if chat else "cmpl-"
        rid = prefix + seq.request_id
        if stream:
            return await self._stream(request, seq, model, rid, text, chat, include_usage)
        try:
            await seq.done.wait()
        finally:
            if not seq.finished:  # the handler was cancelled
                self.engine.abort(seq)
        content = "".join(text.tokens(seq.generated))
        reason_out = seq.finish_reason
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                              "content": content},
                                      "logprobs": None, "finish_reason": reason_out,
                                      "stop_reason": None}
        else:
            choice = {"index": 0, "text": content, "logprobs": None,
                      "finish_reason": reason_out, "stop_reason": None,
                      "prompt_logprobs": None}
        out = {"id": rid, "object": "chat.completion" if chat else "text_completion",
               "created": int(time.time()), "model": model, "choices": [choice],
               "usage": _usage(seq)}
        return web.json_response(out)

    async def _stream(self, request: web.Request, seq: Sequence, model: str, rid: str,
                      text: TextGenerator, chat: bool, include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": model}
        sent = 0
        try:
            await resp.prepare(request)
            if chat:
                first = dict(head, choices=[{"index": 0, "delta": {"role": "assistant",
                                                                    "content": ""},
                                             "logprobs": None, "finish_reason": None}])
                await resp.write(_sse(first))
            while True:
                await seq.changed.wait()
                seq.changed.clear()
                upto = seq.generated
                chunks = []
                for i, tok in enumerate(text.tokens(upto - sent), start=sent + 1):
                    last = seq.finished and i == upto
                    reason = seq.finish_reason if last else None
                    if chat:
                        choice: dict[str, Any] = {"index": 0, "delta": {"content": tok},
                                                  "logprobs": None, "finish_reason": reason}
                    else:
                        choice = {"index": 0, "text": tok, "logprobs": None,
                                  "finish_reason": reason, "stop_reason": None}
                    chunks.append(_sse(dict(head, choices=[choice])))
                if seq.finished and upto == sent:  # finished with no new token (abort)
                    if chat:
                        choice = {"index": 0, "delta": {}, "logprobs": None,
                                  "finish_reason": seq.finish_reason}
                    else:
                        choice = {"index": 0, "text": "", "logprobs": None,
                                  "finish_reason": seq.finish_reason, "stop_reason": None}
                    chunks.append(_sse(dict(head, choices=[choice])))
                sent = upto
                if chunks:
                    await resp.write(b"".join(chunks))
                if seq.finished:
                    break
            tail = []
            if include_usage:
                tail.append(_sse(dict(head, choices=[], usage=_usage(seq))))
            tail.append(b"data: [DONE]\n\n")
            await resp.write(b"".join(tail))
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            log.info("sim %s: client went away from stream %s", self.name, rid)
            raise
        finally:
            if not seq.finished:
                self.engine.abort(seq)
        return resp


def _usage(seq: Sequence) -> dict[str, Any]:
    return {"prompt_tokens": seq.prompt.num_tokens,
            "total_tokens": seq.prompt.num_tokens + seq.generated,
            "completion_tokens": seq.generated,
            "prompt_tokens_details": {"cached_tokens": seq.cached_tokens}}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _bad(f"request body larger than {MAX_BODY_BYTES} bytes") from None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    return body
