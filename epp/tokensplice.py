"""Tokenizing a prompt in pieces that give exactly the whole prompt's token ids.

Typical chat traffic is a long shared system prompt and a short question, rendered by the
chat template into one text. Tokenizing the shared part once and only the question per
request saves most of the work, but only if the pieces' ids joined equal the whole
text's ids. Cutting at an arbitrary place (after the system prompt's text, say) breaks
that: BPE merges and pre-tokenizer regexes see across the cut, and `Metaspace` with
`prepend_scheme: first` (the Llama 2 family) prepends `▁` only to the text at offset 0,
so a suffix tokenized alone gets a `▁` the whole text does not have.

This module cuts only *in front of an anchor*: an added token (`<|eot_id|>`,
`<|start_header_id|>`, `[INST]`, ...) that the chat template emits. The `tokenizers`
library extracts non-normalized added tokens from the raw text first, and then
normalizes, pre-tokenizes and runs the model on each piece between them separately
(`AddedVocabulary::extract_and_normalize`), so nothing merges across an anchor. A piece
is tokenized together with its anchor (`anchor + text up to the next anchor`), which
reproduces the context the piece has in the whole text: it is not at offset 0
(`Metaspace` "first"), the characters before it are the anchor's, and an anchor with
`rstrip` eats the piece's leading whitespace as it does in the whole text. An added token
is used as an anchor only when that argument holds for it:

- not normalized (matched on the raw text, before the normalizer), no `lstrip` (it would
  eat the previous piece's trailing whitespace) and no `single_word` (whether it matches
  depends on the character before it);
- no other added token contains it or overlaps it (the tokenizer matches added tokens
  leftmost-longest; an overlapping one could win over it), and it does not overlap itself;
- its first and last characters are ASCII punctuation (not whitespace, not a word
  character), so another added token's `single_word`/`rstrip` next to it decides the same
  in a piece as in the whole text;
- the tokenizer does not encode special tokens as text (`encode_special_tokens`).

Special tokens a completion prompt gets (`add_special_tokens=True`: BOS, sometimes EOS)
come from the post-processor around the whole sequence; they are measured once (ids
before and after the content) and added around the joined pieces.

Reasoning about a library's internals can be wrong, and versions change, so the plan is
also checked when the tokenizer is loaded: chat renders and random texts built from the
anchors, whitespace, other added tokens and non-ASCII text are tokenized whole and in
pieces, and any difference turns splicing off for that tokenizer (the caller then uses
only its exact-text cache). Property tests (`tests/fuzz/test_fuzz_splice.py`) check the
same for byte-level BPE and `Metaspace` tokenizers.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

MAX_ANCHORS = 32
"""Anchors searched in every prompt; a template uses a handful."""
_EDGE_CHARS = frozenset(string.punctuation) - {"_"}

Piece = tuple[int | None, str]
"""(the id of the anchor the piece starts with, or None for text before the first anchor;
the piece's text, anchor included)."""


@dataclass(frozen=True, slots=True)
class Splicer:
    """Where a tokenizer's input may be cut, and the special tokens around a sequence."""

    anchors: dict[str, int]
    """Anchor text -> its token id."""
    pattern: re.Pattern[str]
    specials: tuple[tuple[int, ...], tuple[int, ...]] | None
    """Ids the post-processor puts before and after the content with
    `add_special_tokens=True`; None: not a fixed wrapper, splice only without them."""

    def pieces(self, text: str) -> list[Piece]:
        """`text` cut in front of every anchor (no empty pieces)."""
        out: list[Piece] = []
        anchors = self.anchors
        start = 0
        anchor: int | None = None
        for m in self.pattern.finditer(text):
            at = m.start()
            if at > start or anchor is not None:
                out.append((anchor, text[start:at]))
            start = at
            anchor = anchors[m.group()]
        if start < len(text) or anchor is not None:
            out.append((anchor, text[start:]))
        return out

    def can_splice(self, add_special_tokens: bool) -> bool:
        return not add_special_tokens or self.specials is not None

    def join(self, parts: Iterable[Sequence[int]], add_special_tokens: bool) -> list[int]:
        """The whole text's ids from its pieces' ids (each tokenized without specials)."""
        out: list[int] = []
        if add_special_tokens:
            assert self.specials is not None
            out.extend(self.specials[0])
        for p in parts:
            out.extend(p)
        if add_special_tokens:
            assert self.specials is not None
            out.extend(self.specials[1])
        return out

    @staticmethod
    def piece_ok(piece: Piece, ids: Sequence[int]) -> bool:
        """A piece's ids start with its anchor's id (else the cut was not where the
        tokenizer matched the anchor: never splice such a text)."""
        return piece[0] is None or (len(ids) > 0 and ids[0] == piece[0])


def _overlaps(a: str, b: str) -> bool:
    """Whether some occurrence of `b` can overlap one of `a` without being inside it:
    a proper suffix of one is a prefix of the other."""
    for x, y in ((a, b), (b, a)):
        for k in range(1, min(len(x), len(y))):
            if x[-k:] == y[:k]:
                return True
    return False


def anchor_candidates(tok: Any) -> dict[str, int]:
    """Added tokens at which the tokenizer provably cuts its input (module docstring)."""
    added = {a.content: (i, a) for i, a in tok.get_added_tokens_decoder().items()}
    out: dict[str, int] = {}
    for content, (i, a) in added.items():
        if (not content or a.normalized or a.lstrip or a.single_word
                or content[0] not in _EDGE_CHARS or content[-1] not in _EDGE_CHARS):
            continue
        if any(other != content and (content in other or _overlaps(content, other))
               for other in added):
            continue
        if _overlaps(content, content):
            continue
        out[content] = i
    return out


def _specials(encode: Callable[[str, bool], list[int]]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The ids the post-processor wraps every single sequence in, or None."""
    found = None
    for probe in ("hello world", "x", "a\nb c"):
        plain, full = encode(probe, False), encode(probe, True)
        n = len(plain)
        for k in range(len(full) - n + 1):
            if full[k:k + n] == plain:
                got = (tuple(full[:k]), tuple(full[k + n:]))
                break
        else:
            return None
        if found is not None and got != found:
            return None
        found = got
    return found


_FRAGMENTS = [" ", "  ", "\n", "\n\n", " \n", "\t", "\r\n", "a", "A", "_", "hello", " world",
              "Hello", "'s", "123", " 4", ".", "!", "?", "é", "漢字", "🙂", "▁", "\u00a0",
              "\u3000", "<", "|", ">", "[", "]", "<s>", "</s>", "x_y", "  z"]


def probe_texts(anchors: Sequence[str], added: Sequence[str], renders: Sequence[str],
                count: int = 200, seed: int = 0) -> list[str]:
    """Texts for the load-time check: chat renders, and random joins of anchors, other
    added tokens and text that is hard on tokenizers (whitespace runs, non-ASCII)."""
    rng = random.Random(seed)
    frags = list(_FRAGMENTS) + list(anchors) * 3 + list(added)[:64]
    out = list(renders)
    for _ in range(count):
        out.append("".join(rng.choice(frags) for _ in range(rng.randint(1, 14))))
    return out


def plan(tok: Any, renders: Sequence[str], *, anchors: dict[str, int] | None = None
         ) -> Splicer | str:
    """A Splicer for `tok` (a `tokenizers.Tokenizer`), or the reason splicing is off.

    `renders` are chat template renders: their anchors are the ones searched for in
    prompts. `anchors` overrides the choice (tests: an unsafe anchor must fail the check).
    """
    if getattr(tok, "encode_special_tokens", False):
        return "encodes_special_tokens_as_text"
    candidates = anchor_candidates(tok) if anchors is None else dict(anchors)
    if anchors is None:
        used = {a: i for a, i in candidates.items() if any(a in r for r in renders)}
        candidates = dict(sorted(used.items(), key=lambda kv: -len(kv[0]))[:MAX_ANCHORS])
    if not candidates:
        return "no_anchor_in_chat_template"

    def encode(text: str, add: bool) -> list[int]:
        return tok.encode(text, add_special_tokens=add).ids  # type: ignore[no-any-return]

    pattern = re.compile("|".join(re.escape(a) for a in sorted(candidates, key=len, reverse=True)))
    sp = Splicer(candidates, pattern, _specials(encode))
    added = [a.content for a in tok.get_added_tokens_decoder().values()]
    for text in probe_texts(list(candidates), added, renders):
        pieces = sp.pieces(text)
        parts = [encode(p, False) for _, p in pieces]
        if not all(Splicer.piece_ok(p, ids) for p, ids in zip(pieces, parts)):
            return "self_check_failed"
        for add in (False, True):
            if sp.can_splice(add) and sp.join(parts, add) != encode(text, add):
                return "self_check_failed"
    return sp
