"""Denoising trajectories: what was committed at each step, and views of it (terminal text, HTML)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from ..files import atomic_write

__all__ = ["TrajectoryStep", "Trajectory", "render_trajectory_text", "render_trajectory_html"]

MASK_GLYPH = "░"

Decoder = Union[Callable[[list[int]], str], Mapping[int, str]]


@dataclass
class TrajectoryStep:
    """One forward pass of one row.

    Attributes:
        forward: the row's forward-pass index (0-based).
        committed: ``(position, token id)`` committed at this step, positions in the full row.
        remasked: positions sent back to [MASK] (ReMDM-style remasking).
        filled: positions set to pad by the stop rule after EOS was committed.
    """

    forward: int
    committed: list[tuple[int, int]] = field(default_factory=list)
    remasked: list[int] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)


@dataclass
class Trajectory:
    """The decoding history of one row: its initial ids (masks included) and every step.

    ``start`` is the first position shown by the renderers (the canvas start in ``generate``, 0 in
    ``infill``).
    """

    initial: list[int]
    start: int
    mask_id: int
    steps: list[TrajectoryStep] = field(default_factory=list)

    def states(self) -> list[list[int]]:
        """The row's ids before the first step and after each step."""
        ids = list(self.initial)
        out = [list(ids)]
        for step in self.steps:
            for pos, tok in step.committed:
                ids[pos] = tok
            for pos in step.remasked:
                ids[pos] = self.mask_id
            out.append(list(ids))
        return out

    def final(self, pad_id: int) -> list[int]:
        """The row's ids after the last step (with pad written where the stop rule filled)."""
        ids = self.states()[-1]
        for step in self.steps:
            for pos in step.filled:
                ids[pos] = pad_id
        return ids


def _piece_fn(decode: Decoder) -> Callable[[int], str]:
    if isinstance(decode, Mapping):
        return lambda t: str(decode.get(t, f"<{t}>"))
    return lambda t: decode([t])


def _frames(traj: Trajectory, decode: Decoder, hide: Sequence[int]):
    """Yield ``(label, [(text, kind)])`` per state; kind in mask|new|remasked|filled|old."""
    piece = _piece_fn(decode)
    states = traj.states()
    hidden = set(hide)
    filled: set[int] = set()
    yield "start", [(MASK_GLYPH if t == traj.mask_id else piece(t), "mask" if t == traj.mask_id else "old")
                    for t in states[0][traj.start:] if t not in hidden or t == traj.mask_id]
    for step, ids in zip(traj.steps, states[1:]):
        new = {p for p, _ in step.committed}
        remasked = set(step.remasked)
        filled |= set(step.filled)
        tokens = []
        for pos in range(traj.start, len(ids)):
            tok = ids[pos]
            if pos in filled:
                kind, text = "filled", ""
            elif tok == traj.mask_id:
                kind, text = ("remasked" if pos in remasked else "mask"), MASK_GLYPH
            else:
                kind, text = ("new" if pos in new else "old"), piece(tok)
                if tok in hidden:
                    continue
            if kind != "filled":
                tokens.append((text, kind))
        yield f"{step.forward + 1:>3}", tokens


def render_trajectory_text(
    trajectory: Trajectory,
    decode: Decoder,
    *,
    color: bool = False,
    sep: Optional[str] = None,
    hide_ids: Sequence[int] = (),
) -> str:
    """Plain-text view, one line per step: masks as ``░``, newly committed tokens in ``[brackets]``
    (or green with ``color=True``, ANSI), re-masked slots as ``▒``.

    Args:
        decode: ``ids -> str`` (e.g. a tokenizer's ``decode``; called on one id at a time) or an
            ``id -> token`` mapping.
        sep: string between tokens; default ``""`` for a decode function (subword pieces carry their
            own spaces), ``" "`` for a mapping.
        hide_ids: ids not shown (e.g. pad).
    """
    sep = sep if sep is not None else (" " if isinstance(decode, Mapping) else "")
    lines = []
    for label, tokens in _frames(trajectory, decode, hide_ids):
        parts = []
        for text, kind in tokens:
            text = text.replace("\n", "\\n")
            if kind == "new":
                text = f"\x1b[1;32m{text}\x1b[0m" if color else f"[{text}]"
            elif kind == "remasked":
                text = "▒"
            parts.append(text)
        lines.append(f"{label} | {sep.join(parts)}")
    return "\n".join(lines)


_CSS = """
body { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; background: #fafafa; color: #222;
       margin: 1.5em; }
h2 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.step { white-space: pre-wrap; line-height: 1.6; border-bottom: 1px solid #eee; padding: 1px 0; }
.label { color: #999; display: inline-block; width: 3.5em; }
.mask { color: #bbb; }
.new { background: #c8f7c5; font-weight: bold; border-radius: 3px; }
.remasked { background: #f7d4c5; color: #a33; }
.legend span { margin-right: 1.2em; }
"""


def render_trajectory_html(
    trajectories: Union[Trajectory, Sequence[Trajectory]],
    decode: Decoder,
    path: Union[None, str, Path] = None,
    *,
    titles: Optional[Sequence[str]] = None,
    sep: Optional[str] = None,
    hide_ids: Sequence[int] = (),
) -> str:
    """A self-contained HTML page (inline CSS, no scripts): per row, one line per step, newly
    committed tokens highlighted, masks as ``░``, re-masked slots marked. Written to ``path`` if given.

    Returns the HTML text.
    """
    if isinstance(trajectories, Trajectory):
        trajectories = [trajectories]
    sep = sep if sep is not None else (" " if isinstance(decode, Mapping) else "")
    body = [
        '<div class="legend"><span class="new">new</span><span class="mask">'
        f"{MASK_GLYPH} masked</span><span class=\"remasked\">{MASK_GLYPH} re-masked</span></div>"
    ]
    for i, traj in enumerate(trajectories):
        title = titles[i] if titles is not None and i < len(titles) else f"row {i}"
        body.append(f"<h2>{html.escape(title)} ({len(traj.steps)} steps)</h2>")
        for label, tokens in _frames(traj, decode, hide_ids):
            spans = html.escape(sep).join(f'<span class="{kind}">{html.escape(text)}</span>'
                                          for text, kind in tokens)
            body.append(f'<div class="step"><span class="label">{html.escape(label)}</span>{spans}</div>')
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>diffusion_lm trajectory</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    if path is not None:
        with atomic_write(path) as handle:
            handle.write(page)
    return page
