"""Token ids for a request, as the model server will compute them.

Exact prefix-cache routing compares a request's KV blocks with the blocks model servers
report, and blocks are cut from token ids. So the EPP tokenizes like vLLM: with the
model's own `tokenizer.json` (the `tokenizers` library), and for chat requests after
rendering the messages with the model's chat template from `tokenizer_config.json`
(Jinja2, sandboxed, `add_generation_prompt=True`; the template carries the BOS token, so
no special tokens are added), while completion prompts get the tokenizer's special tokens.

Tokenizers are loaded from local directories (model name -> directory; in Kubernetes a
mounted volume), never downloaded. A directory that is missing or corrupt is logged once
and reported by `TokenizerError.reason`; callers fall back to approximate routing.

`Tokenizer.encode` holds the GIL (measured: a spinning thread got ~7% of its idle rate),
`encode_batch_fast` releases it, so `encode_async` runs long prompts in one worker thread
and short ones inline, where a thread hop would cost more than the work. Results are kept
in a small LRU keyed by the exact text: retries, Explain after a pick, and identical
prompts (benchmarks, health probes) hit it.

Prompts that share a long prefix (a system prompt) but differ after it are cached by
piece: when the tokenizer is loaded, `epp.tokensplice` decides whether its input can be
cut in front of the special tokens the chat template emits (`<|eot_id|>`, ...) so that the
pieces' ids joined are exactly the whole text's, and checks that on probe texts. If so, a
prompt of `SPLICE_MIN_CHARS` or more is cut there, each piece is looked up in the same
exact-text LRU, and only the pieces not found (the new question) are tokenized. If not
(logged once per model), only whole prompts are cached.

`encode` and `encode_async` run one flow, `TokenizerPool._flow`: a generator that yields
what to tokenize (the missing pieces, or the whole text) and is sent the ids. The two only
decide where that runs: `encode` inline, `encode_async` inline when short, else in the
worker thread, so the event loop is never blocked by a long encode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generator, Mapping, Sequence

from epp import tokensplice
from epp.tokensplice import Piece, Splicer

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
INLINE_MAX_CHARS = 2048
"""Prompts up to this length are tokenized on the calling thread (see module docstring)."""
CACHE_MAX_TOKENS = 2_000_000
"""Bound of the LRU of tokenized prompts, in token ids held (~8 bytes each in arrays)."""
SPLICE_MIN_CHARS = 1024
"""Prompts shorter than this are tokenized whole: little to save (benchmarks/RESULTS.md)."""
_PROBE_CHATS: list[list[dict[str, str]]] = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello!\n"},
     {"role": "user", "content": "  ok  "}],
    [{"role": "user", "content": "x"}],
]
"""Conversations rendered at load time: the special tokens in them are where prompts are
cut (tokensplice)."""


class TokenizerError(Exception):
    """A tokenizer that cannot be used; `reason` is a bounded metric label value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""


def _token_text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):
        return v["content"]
    return ""


def _template_source(cfg: Mapping[str, Any]) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, str):
        return t
    if isinstance(t, list):  # [{name, template}, ...]: vLLM uses "default"
        for entry in t:
            if isinstance(entry, Mapping) and entry.get("name") == "default":
                src = entry.get("template")
                return src if isinstance(src, str) else None
    return None


class ModelTokenizer:
    """One model's tokenizer and chat template, loaded from a directory."""

    def __init__(self, model: str, directory: str | Path) -> None:
        from tokenizers import Tokenizer  # heavy import, only when a tokenizer is configured

        self.model = model
        d = Path(directory)
        path = d / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError("tokenizer_missing", f"{path} does not exist")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception on bad JSON
            raise TokenizerError("tokenizer_corrupt", f"{path}: {e}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.template: ChatTemplate | None = None
        cfg_path = d / CONFIG_FILE
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text())
            except (OSError, ValueError) as e:
                raise TokenizerError("tokenizer_corrupt", f"{cfg_path}: {e}") from None
            if not isinstance(cfg, dict):
                raise TokenizerError("tokenizer_corrupt", f"{cfg_path}: not a JSON object")
            src = _template_source(cfg)
            if src is not None:
                self.template = ChatTemplate(src, _token_text(cfg.get("bos_token")),
                                             _token_text(cfg.get("eos_token")))
        self._compiled: Any = None
        self._lock = threading.Lock()
        self._splicer: Splicer | str | None = None

    def splicer(self) -> Splicer | None:
        """How prompts may be cut into pieces tokenized separately (None: not safely;
        `splice_off_reason` says why). Decided, with a self-check, on first use."""
        if self._splicer is None:
            renders = []
            if self.template is not None:
                for chat in _PROBE_CHATS:
                    try:
                        renders.append(self.render_chat(chat))
                    except TokenizerError:
                        pass  # templates may refuse some role orders
            self._splicer = tokensplice.plan(self._tok, renders)
        return self._splicer if isinstance(self._splicer, Splicer) else None

    @property
    def splice_off_reason(self) -> str | None:
        return self._splicer if isinstance(self._splicer, str) else None

    # -- rendering -------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Any], extra: Mapping[str, Any] | None = None) -> str:
        """The prompt text vLLM builds from chat messages (raises TokenizerError)."""
        if self.template is None:
            raise TokenizerError("no_chat_template", f"model {self.model!r} has no chat template")
        tmpl = self._template()
        ctx: dict[str, Any] = dict(extra or {})
        ctx.update(messages=list(messages), add_generation_prompt=True,
                   bos_token=self.template.bos_token, eos_token=self.template.eos_token)
        try:
            return str(tmpl.render(**ctx))
        except Exception as e:  # template errors, raise_exception(), sandbox violations
            raise TokenizerError("chat_template_error", f"chat template: {e}") from None

    def _template(self) -> Any:
        if self._compiled is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            assert self.template is not None
            try:
                self._compiled = env.from_string(self.template.source)
            except Exception as e:
                raise TokenizerError("chat_template_error", f"chat template: {e}") from None
        return self._compiled

    # -- tokenizing ------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text` on this thread (holds the GIL); TokenizerError for text the
        tokenizer cannot take (lone surrogates, legal in JSON strings)."""
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids  # type: ignore[no-any-return]
        except Exception as e:  # the Rust side raises TypeError/Exception
            raise TokenizerError("untokenizable", f"cannot tokenize the prompt: {e}") from None

    def encode_unlocked(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids, releasing the GIL while the Rust side works (for a worker thread)."""
        try:
            return self._tok.encode_batch_fast(  # type: ignore[no-any-return]
                [text], add_special_tokens=add_special_tokens)[0].ids
        except Exception as e:
            raise TokenizerError("untokenizable", f"cannot tokenize the prompt: {e}") from None

    def encode_pieces(self, texts: Sequence[str], unlocked: bool = False) -> list[list[int]]:
        """Token ids of each text without special tokens. `unlocked` (for the worker
        thread): one batch call that releases the GIL; it runs on the library's rayon
        pool, so short pieces on the event loop's thread are tokenized with `encode`
        instead, which has no thread hop to wait for on a busy machine."""
        if not unlocked:
            return [self.encode(t, False) for t in texts]
        try:
            return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]
        except Exception as e:
            raise TokenizerError("untokenizable", f"cannot tokenize the prompt: {e}") from None


@dataclass(slots=True)
class _Spliced:
    """A prompt cut into pieces: the ids of those found in the cache, the texts of the rest."""

    splicer: Splicer
    pieces: list[Piece]
    found: list[list[int] | None]
    missing: list[str]


@dataclass(slots=True)
class _Need:
    """What `TokenizerPool._flow` asks its driver to tokenize: a prompt's missing pieces,
    or (`whole` set) the prompt itself. The drivers differ only in where this runs."""

    tok: ModelTokenizer
    texts: list[str]
    chars: int
    """Characters to tokenize: the async driver hands long work to the worker thread."""
    whole: Prompt | None = None

    def encode(self, unlocked: bool = False) -> list[list[int]]:
        """The texts' ids, in order; `unlocked` (worker thread): releasing the GIL."""
        if self.whole is None:
            return self.tok.encode_pieces(self.texts, unlocked)
        enc = self.tok.encode_unlocked if unlocked else self.tok.encode
        return [enc(self.whole.text, self.whole.add_special_tokens)]


_Flow = Generator[_Need, list[list[int]], list[int]]
"""Yields what to tokenize, is sent its ids, returns the prompt's ids."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """What to tokenize: the text and whether the tokenizer adds its special tokens."""

    text: str
    add_special_tokens: bool


def prompt_of(tok: ModelTokenizer, api: str, body: Mapping[str, Any] | None) -> Prompt | None:
    """The text vLLM would tokenize for a request body, or None when there is none.

    Chat requests are rendered with the chat template (and `chat_template_kwargs`);
    completion prompts as given. Token-id prompts, and the other APIs (responses,
    embeddings: their rendering is not reproduced here), give None: the caller then
    routes approximately.
    """
    if api == "chat/completions" and body is not None:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        kwargs = body.get("chat_template_kwargs")
        extra = dict(kwargs) if isinstance(kwargs, Mapping) else {}
        tools = body.get("tools")
        if tools is not None:
            extra.setdefault("tools", tools)
        return Prompt(tok.render_chat(messages, extra), False)
    if api == "completions" and body is not None:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        return Prompt(p, True) if isinstance(p, str) else None
    return None


class TokenizerPool:
    """Tokenizers by model name, a cache of results, and one worker thread."""

    def __init__(self, paths: Mapping[str, str], *, cache_max_tokens: int = CACHE_MAX_TOKENS,
                 inline_max_chars: int = INLINE_MAX_CHARS,
                 splice_min_chars: int | None = SPLICE_MIN_CHARS) -> None:
        self.paths = dict(paths)
        self._loaded: dict[str, ModelTokenizer] = {}
        self._errors: dict[str, TokenizerError] = {}
        self._cache: OrderedDict[tuple[str, str, bool], list[int]] = OrderedDict()
        self._cached_tokens = 0
        self.cache_max_tokens = cache_max_tokens
        self.inline_max_chars = inline_max_chars
        self.splice_min_chars = splice_min_chars
        """None: never cut prompts into pieces (whole-text cache only)."""
        self._pool: ThreadPoolExecutor | None = None

    def load_all(self) -> dict[str, TokenizerError]:
        """Load every configured tokenizer now; returns the failures by model."""
        for model in self.paths:
            try:
                self.get(model)
            except TokenizerError:
                pass  # kept in _errors and logged once
        return dict(self._errors)

    def get(self, model: str) -> ModelTokenizer:
        """The tokenizer for `model` (raises TokenizerError, once loaded or failed: cached).

        A model without its own entry uses the only configured tokenizer when there is
        exactly one (adapters share their base model's tokenizer).
        """
        tok = self._loaded.get(model)
        if tok is not None:
            return tok
        err = self._errors.get(model)
        if err is not None:
            raise err
        path = self.paths.get(model)
        if path is None:
            if len(self.paths) == 1:
                only = next(iter(self.paths))
                return self.get(only)
            raise TokenizerError("no_tokenizer", f"no tokenizer configured for model {model!r}")
        try:
            tok = self._loaded[model] = ModelTokenizer(model, path)
        except TokenizerError as e:
            self._errors[model] = e
            log.warning("tokenizer for model %r unusable (%s): %s; prefix routing for it falls "
                        "back to the approximate scorer", model, e.reason, e)
            raise
        if self.splice_min_chars is not None:
            if tok.splicer() is None:
                log.info("tokenizer for model %r: prompts are cached whole only, not by "
                         "prefix (%s)", model, tok.splice_off_reason)
            else:
                log.info("tokenizer for model %r: prompts are cached by prefix", model)
        return tok

    def cached(self, model: str, prompt: Prompt) -> list[int] | None:
        key = (model, prompt.text, prompt.add_special_tokens)
        ids = self._cache.get(key)
        if ids is not None:
            self._cache.move_to_end(key)
        return ids

    def _remember(self, model: str, prompt: Prompt, ids: list[int]) -> None:
        self._remember_key((model, prompt.text, prompt.add_special_tokens), ids)

    def _remember_key(self, key: tuple[str, str, bool], ids: list[int]) -> None:
        if key in self._cache or len(ids) > self.cache_max_tokens // 4:
            return
        self._cache[key] = ids
        self._cached_tokens += len(ids)
        while self._cached_tokens > self.cache_max_tokens:
            _, old = self._cache.popitem(last=False)
            self._cached_tokens -= len(old)

    # -- by piece (tokensplice) --------------------------------------------------------

    def _splice(self, model: str, tok: ModelTokenizer, prompt: Prompt) -> _Spliced | None:
        """The prompt in pieces with the cached ones' ids, or None to tokenize it whole."""
        if self.splice_min_chars is None or len(prompt.text) < self.splice_min_chars:
            return None
        sp = tok.splicer()
        if sp is None or not sp.can_splice(prompt.add_special_tokens):
            return None
        pieces = sp.pieces(prompt.text)
        if len(pieces) < 2:
            return None
        cache = self._cache
        found: list[list[int] | None] = []
        missing: list[str] = []
        for _, text in pieces:
            key = (model, text, False)
            ids = cache.get(key)
            if ids is None:
                if text not in missing:  # a handful of pieces: a list is fine
                    missing.append(text)
            else:
                cache.move_to_end(key)
            found.append(ids)
        return _Spliced(sp, pieces, found, missing)

    def _join(self, model: str, prompt: Prompt, s: _Spliced,
              new: Sequence[list[int]]) -> list[int] | None:
        """The prompt's ids from its pieces' (None: a piece did not start with its anchor,
        tokenize the prompt whole)."""
        got = dict(zip(s.missing, new))
        parts = []
        for piece, ids in zip(s.pieces, s.found):
            if ids is None:
                ids = got[piece[1]]
                if not s.splicer.piece_ok(piece, ids):
                    return None
                self._remember_key((model, piece[1], False), ids)
            parts.append(ids)
        return s.splicer.join(parts, prompt.add_special_tokens)

    # -- entry points ------------------------------------------------------------------

    def _flow(self, model: str, prompt: Prompt) -> _Flow:
        """The one tokenization flow of both entry points, after a miss in the exact-text
        cache: the prompt's pieces (the missing ones tokenized, then joined), else the
        whole text. What to tokenize is yielded to the caller, which decides where it runs."""
        tok = self.get(model)
        s = self._splice(model, tok, prompt)
        if s is not None:
            new = (yield _Need(tok, s.missing, sum(map(len, s.missing)))) if s.missing else []
            ids = self._join(model, prompt, s, new)
            if ids is not None:
                return ids
        ids, = yield _Need(tok, [prompt.text], len(prompt.text), prompt)
        self._remember(model, prompt, ids)
        return ids

    def encode(self, model: str, prompt: Prompt) -> list[int]:
        """Token ids on this thread (for Explain and callers that cannot await)."""
        ids = self.cached(model, prompt)
        if ids is not None:  # checked here: a hit is not worth starting the flow for
            return ids
        flow = self._flow(model, prompt)
        try:
            need = next(flow)
            while True:
                need = flow.send(need.encode())
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def encode_async(self, model: str, prompt: Prompt) -> list[int]:
        """Token ids; long prompts (or long new pieces of one) are tokenized in the
        worker thread."""
        ids = self.cached(model, prompt)
        if ids is not None:
            return ids
        flow = self._flow(model, prompt)
        try:
            need = next(flow)
            while True:
                if need.chars <= self.inline_max_chars:
                    ids = need.encode()
                else:
                    ids = await asyncio.get_running_loop().run_in_executor(
                        self._executor(), need.encode, True)
                need = flow.send(ids)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="epp-tokenize")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
