"""Span syntax for infilling from text: ``[[MASK]]`` and ``[[MASK:n]]`` holes inside plain text.

    "The capital of France is [[MASK:3]]. It lies on the [[MASK]]."

* ``[[MASK]]`` -- a hole of ``default_slots`` [MASK] tokens (8 unless told otherwise);
* ``[[MASK:n]]`` -- a hole of exactly ``n`` tokens, ``n`` a positive integer (spaces allowed: ``[[ MASK : 4
  ]]``); the sampler fills every slot with text (never an end or pad token);
* ``[[MASK:<=n]]`` -- a variable-length hole of at most ``n`` tokens: slots the model leaves empty
  (pad) are dropped and the text closes up around the fill;
* every other character is literal text. ``[[`` always opens a span, so text cannot contain a
  literal ``[[`` (a lone ``]]`` is fine).

The model side tokenizes the text pieces (:func:`spans_to_ids` takes any ``tokenize`` callable).
Pieces are tokenized separately, so a word split by a hole may tokenize differently than it would
whole; put holes at word boundaries.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, Union

__all__ = ["Span", "parse_spans", "spans_to_ids", "flexible_slots", "DEFAULT_MASK_SLOTS"]

DEFAULT_MASK_SLOTS = 8

Span = tuple[str, Union[str, int]]  # ("text", "some text"), ("mask", n_slots) or ("flex", max_slots)

_BODY = re.compile(r"^\s*MASK\s*(?::\s*(?P<le><=)?\s*(?P<n>[^\s]*)\s*)?$", re.IGNORECASE)


def parse_spans(text: str, default_slots: int = DEFAULT_MASK_SLOTS) -> list[Span]:
    """Split ``text`` into ``("text", str)``, ``("mask", n)`` (fixed size) and ``("flex", n)`` (at most
    ``n`` tokens) pieces, in order (empty text pieces dropped).

    Raises:
        ValueError: an unclosed ``[[``, an unknown span (``[[FOO]]``), or a slot count that is not a
            positive integer (``[[MASK:x]]``, ``[[MASK:0]]``); the message names the character position.
    """
    if default_slots < 1:
        raise ValueError(f"default_slots must be >= 1, got {default_slots}")
    spans: list[Span] = []
    i = 0
    while True:
        start = text.find("[[", i)
        if start < 0:
            if i < len(text):
                spans.append(("text", text[i:]))
            return spans
        if start > i:
            spans.append(("text", text[i:start]))
        end = text.find("]]", start + 2)
        if end < 0:
            raise ValueError(
                f"unclosed '[[' at position {start} (…{text[start:start + 20]!r}); "
                "write holes as [[MASK]] or [[MASK:n]]"
            )
        body = text[start + 2 : end]
        if "[[" in body:
            raise ValueError(f"unclosed '[[' at position {start}: another '[[' opens at position "
                             f"{start + 2 + body.index('[[')} before ']]'")
        match = _BODY.match(body)
        if match is None:
            raise ValueError(f"unknown span '[[{body}]]' at position {start}; only [[MASK]], [[MASK:n]] and "
                             "[[MASK:<=n]] are supported")
        count = match.group("n")
        if count is None:
            n = default_slots
        elif re.fullmatch(r"[0-9]+", count) is None or int(count) < 1:
            raise ValueError(
                f"invalid slot count {count!r} in '[[{body}]]' at position {start}: "
                "expected a positive integer, e.g. [[MASK:8]] or [[MASK:<=8]]"
            )
        else:
            n = int(count)
        spans.append(("flex" if match.group("le") else "mask", n))
        i = end + 2


def spans_to_ids(
    spans: Union[str, Sequence[Span]],
    tokenize: Callable[[str], list[int]],
    mask_id: int,
    default_slots: int = DEFAULT_MASK_SLOTS,
) -> list[int]:
    """Token ids for :func:`diffusion_lm.sampling.infill`: text pieces tokenized by ``tokenize`` (which
    should add no special tokens), each hole replaced by its number of ``mask_id`` slots (a ``flex``
    hole by its maximum; pass :func:`flexible_slots` as ``infill``'s ``flexible``).

    ``spans`` is the text itself (parsed with :func:`parse_spans`) or its parsed spans.
    """
    if isinstance(spans, str):
        spans = parse_spans(spans, default_slots)
    ids: list[int] = []
    for kind, value in spans:
        if kind == "text":
            ids.extend(int(t) for t in tokenize(str(value)))
        elif kind in ("mask", "flex"):
            ids.extend([mask_id] * int(value))
        else:
            raise ValueError(f"unknown span kind {kind!r}; expected 'text', 'mask' or 'flex'")
    return ids


def flexible_slots(spans: Sequence[Span], tokenize: Callable[[str], list[int]]) -> list[bool]:
    """Per position of :func:`spans_to_ids`' row: whether it is a slot of a variable-length hole."""
    out: list[bool] = []
    for kind, value in spans:
        if kind == "text":
            out.extend([False] * len(tokenize(str(value))))
        else:
            out.extend([kind == "flex"] * int(value))
    return out
