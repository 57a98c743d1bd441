"""Logits processors: edit the denoiser's logits at the queried slots before proposing and ranking.

They run in order on an ``[N, V]`` float32 copy of the logits (the denoiser's tensor is never
modified). A processor may set entries to ``-inf``; if a slot ends up with every token banned,
the sampler falls back to that slot's unprocessed logits rather than failing.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import torch

from ..errors import ConfigError
from .context import StepContext
from .ngrams import ngram_bans
from .policies import Policy

__all__ = [
    "LogitsProcessor",
    "StepChecker",
    "EosPolicy",
    "RepetitionGuard",
    "SuppressTokens",
    "HoleContent",
    "PROCESSORS",
    "resolve_processor",
]


class StepChecker:
    """Vetoes commits that conflict with tokens committed earlier *in the same step*.

    Logits processors see the state before the step, so two slots decided together can still
    break a rule (both neighbours become "a", or two new copies of one n-gram). The sampler walks a
    row's ranked candidates, asks :meth:`allows`, and calls :meth:`accept` for each commit.
    """

    def allows(self, pos: int, token: int) -> bool:
        return True

    def accept(self, pos: int, token: int) -> None:
        pass


class LogitsProcessor(Policy):
    """Base class: ``__call__(logits [N, V], ctx) -> logits`` (may modify ``logits`` in place).

    A processor whose rule also constrains tokens committed together in one step returns a
    :class:`StepChecker` from :meth:`step_checker`. Its ``name``, ``to_dict``, ``repr`` and equality
    are :class:`~diffusion_lm.sampling.policies.Policy`'s.
    """

    def __call__(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def step_checker(self, ids: list[int], usable: list[bool], ctx: StepContext) -> Optional[StepChecker]:
        """A checker for one row at this step, or None. ``ids``: the row's tokens; ``usable``: positions
        holding answer text (known, in the repetition region, not EOS/pad)."""
        return None



class SuppressTokens(LogitsProcessor):
    """Never propose the listed token ids (e.g. a tokenizer's unused or control tokens)."""

    name = "suppress"

    def __init__(self, token_ids: Sequence[int] = ()) -> None:
        self.token_ids = [int(t) for t in token_ids]

    def __call__(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.token_ids:
            if max(self.token_ids) >= logits.shape[-1] or min(self.token_ids) < 0:
                raise ConfigError(
                    f"suppress_tokens {self.token_ids} contains ids outside the vocabulary (size "
                    f"{logits.shape[-1]})"
                )
            logits[:, torch.tensor(self.token_ids, device=logits.device)] = float("-inf")
        return logits


class HoleContent(LogitsProcessor):
    """Infill holes take text, not an ending: EOS is never proposed inside a hole, and pad only in the
    slots of a variable-length hole (``ctx.flexible``), where it means "no token here" and the text
    closes up around it.

    Without it a small model fills a fixed hole with end/pad tokens (they are its most confident
    predictions wherever the context looks finished) and the hole comes back empty. ``infill`` adds it
    to every call; it has no registry name because it reads the hole layout of the call.
    """

    name = "holes"

    def __call__(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits
        if ctx.flexible is None:
            logits[:, ctx.pad_id] = float("-inf")
        else:
            logits[~ctx.flexible[ctx.q_rows, ctx.q_pos], ctx.pad_id] = float("-inf")
        if ctx.eos_id != ctx.pad_id:  # aliased (dLLM's ModernBERT setup): the pad rule above decides
            logits[:, ctx.eos_id] = float("-inf")
        return logits


class EosPolicy(LogitsProcessor):
    """End-of-answer policy: EOS only at the decoded frontier, or where the model is sure.

    In the padded tail EOS (and pad) are easy, confident predictions, so they win the confidence
    ranking and cut answers short (LLaDA #39 "EOS flooding"). This policy allows EOS at a slot only if

    * it is the *frontier*: the first still-masked slot after the last committed answer token
      (so EOS never lands in the middle of text already decoded), or
    * EOS's own probability there is at least ``eos_threshold``,

    and never once the row has an EOS. With ``ban_pad`` the filler token is never proposed: the stop
    rule writes it after EOS (skipped when pad and EOS are the same id, as in dLLM's ModernBERT setup).
    Use it for every chat answer; ``infill`` leaves it off by default (holes are not answers).
    """

    name = "eos"

    def __init__(self, eos_threshold: float = 0.9, ban_pad: bool = True) -> None:
        self.eos_threshold = float(eos_threshold)
        self.ban_pad = bool(ban_pad)

    def __call__(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits
        eos, pad = ctx.eos_id, ctx.pad_id
        b, w = ctx.ids.shape
        pos = torch.arange(w, device=logits.device).expand(b, w)
        committed = ctx.editable & ~ctx.masked
        content = committed & (ctx.ids != eos) & (ctx.ids != pad)
        last_content = torch.where(content, pos, torch.full_like(pos, -1)).max(dim=1).values
        after = ctx.masked & (pos > last_content[:, None])
        frontier = torch.where(after, pos, torch.full_like(pos, w + 1)).min(dim=1).values
        has_eos = (committed & (ctx.ids == eos)).any(dim=1)

        log_z = logits.logsumexp(dim=-1)
        end_logit = logits[:, eos]
        # Off the frontier only EOS's own probability counts: a confident pad deep in the tail says
        # "the answer ended somewhere before here", not "it ends here"; placing EOS there would force
        # content into every slot before it.
        p_eos = (end_logit - log_z).exp()
        if self.ban_pad and pad != eos:
            # At the frontier filler and EOS both say "the answer has ended": EOS carries both masses.
            end_logit = torch.logaddexp(end_logit, logits[:, pad])
        allowed = (ctx.q_pos == frontier[ctx.q_rows]) | (p_eos >= self.eos_threshold)
        allowed &= ~has_eos[ctx.q_rows]
        logits[:, eos] = torch.where(allowed, end_logit, torch.full_like(p_eos, float("-inf")))
        if self.ban_pad and pad != eos:
            logits[:, pad] = float("-inf")
        return logits


class RepetitionGuard(LogitsProcessor):
    """Discourage the loops masked-diffusion decoders fall into, in both directions.

    Slots far from decoded context fall back to copies of nearby tokens and frequent tokens, and
    neighbours decided in the same step duplicate each other ("a a"). Three rules:

    * ``penalty``: subtract this many nats from tokens already present in the answer within
      ``window`` positions to the left or right of the slot (a presence penalty; shift-invariant, so it
      does not depend on the logits' offset as the multiplicative CTRL penalty does);
    * ``ngram_size`` (n >= 2, 0 = off): ban a token if placing it would complete, at any offset, an
      n-gram that already occurs in the answer, or two equal n-grams at once ("x [x] x" for n = 2);
    * ``no_adjacent_duplicates``: never commit the same token at two neighbouring slots in one step
      (the left and right neighbour both count).

    The first two act on the logits (so the proposer picks another token); the n-gram and adjacency
    rules are also enforced between slots committed in the same step (:class:`StepChecker`), which
    logits computed before the step cannot see. A fixed-count selector still meets its count: if
    every remaining candidate conflicts, the best conflicting ones are committed.

    Only answer text counts (the canvas in ``generate``, the whole sequence in ``infill``); EOS and
    pad are ignored. Turn it on for chat; it has no effect on text without repeats.
    """

    name = "repetition"

    def __init__(
        self,
        penalty: float = 2.0,
        window: int = 8,
        ngram_size: int = 3,
        no_adjacent_duplicates: bool = True,
    ) -> None:
        if penalty < 0:
            raise ConfigError(f"repetition guard: penalty must be >= 0, got {penalty}")
        if window < 0:
            raise ConfigError(f"repetition guard: window must be >= 0, got {window}")
        if ngram_size == 1 or ngram_size < 0:
            raise ConfigError(f"repetition guard: ngram_size must be 0 (off) or >= 2, got {ngram_size}")
        self.penalty = float(penalty)
        self.window = int(window)
        self.ngram_size = int(ngram_size)
        self.no_adjacent_duplicates = bool(no_adjacent_duplicates)

    def __call__(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits
        if self.penalty > 0 and self.window > 0:
            logits = self._presence_penalty(logits, ctx)
        if self.ngram_size >= 2:
            logits = self._block_ngrams(logits, ctx)
        return logits

    def step_checker(self, ids: list[int], usable: list[bool], ctx: StepContext) -> Optional[StepChecker]:
        if not self.no_adjacent_duplicates and self.ngram_size < 2:
            return None
        return _RepetitionChecker(self, ids, usable, ctx.eos_id, ctx.pad_id)

    def _presence_penalty(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        usable = ctx.known & ctx.region & (ctx.ids != ctx.eos_id) & (ctx.ids != ctx.pad_id)
        w = usable.shape[1]
        offsets = torch.arange(-self.window, self.window + 1, device=logits.device)
        offsets = offsets[offsets != 0]
        nb = ctx.q_pos[:, None] + offsets[None, :]  # [N, 2*window] neighbour positions
        inside = (nb >= 0) & (nb < w)
        nb = nb.clamp(0, w - 1)
        rows = ctx.q_rows[:, None].expand_as(nb)
        valid = inside & usable[rows, nb]
        # Invalid neighbours point at the [MASK] column, which is -inf anyway and cleared below.
        tokens = torch.where(valid, ctx.ids[rows, nb], torch.full_like(nb, ctx.mask_id))
        hit = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, tokens, True)
        hit[:, ctx.mask_id] = False
        return logits.sub_(hit.to(logits.dtype) * self.penalty)

    def _block_ngrams(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        n = self.ngram_size
        if ctx.vectorized:
            ids = ctx.ids_cpu
            usable = ctx.known_cpu & ctx.region_cpu & (ids != ctx.eos_id) & (ids != ctx.pad_id)
            ban = ngram_bans(ctx.ids_cpu, usable, ctx.q_rows, ctx.q_pos, n, logits.shape[-1])
            return logits.masked_fill_(ban.to(logits.device), float("-inf"))
        ids_cpu = ctx.ids_cpu
        usable = (ctx.known_cpu & ctx.region_cpu & (ids_cpu != ctx.eos_id) & (ids_cpu != ctx.pad_id)).tolist()
        ids = ctx.ids_cpu.tolist()
        indexes: dict[int, dict[tuple, set[int]]] = {}
        banned_rows: list[int] = []
        banned_tokens: list[int] = []
        for qi, (r, i) in enumerate(zip(ctx.q_rows.tolist(), ctx.q_pos.tolist())):
            grams = list(_grams_through(ids[r], usable[r], i, n))
            if not grams:
                continue
            index = indexes.get(r)
            if index is None:
                index = indexes[r] = _ngram_index(ids[r], usable[r], n)
            banned: set[int] = set()
            for key in grams:
                banned |= index.get(key, set())
            for _, others in grams:  # only a token already next to the slot can repeat itself
                for token in set(others) - banned:
                    if _repeats_itself(grams, token):
                        banned.add(token)
            banned_rows += [qi] * len(banned)
            banned_tokens += list(banned)
        if banned_rows:
            rows = torch.tensor(banned_rows, device=logits.device)
            logits[rows, torch.tensor(banned_tokens, device=logits.device)] = float("-inf")
        return logits


class _RepetitionChecker(StepChecker):
    """Same-step rules of :class:`RepetitionGuard`: no identical left/right neighbours committed
    together, and no n-gram completed twice by tokens committed together."""

    def __init__(self, guard: RepetitionGuard, ids: list[int], usable: list[bool], eos_id: int,
                 pad_id: int) -> None:
        self.adjacent = guard.no_adjacent_duplicates
        self.n = guard.ngram_size
        self.ids, self.usable = list(ids), list(usable)
        self.specials = (eos_id, pad_id)
        self.now: dict[int, int] = {}
        self.index = _ngram_index(self.ids, self.usable, self.n) if self.n >= 2 else {}

    def allows(self, pos: int, token: int) -> bool:
        if self.adjacent and (self.now.get(pos - 1) == token or self.now.get(pos + 1) == token):
            return False
        if self.n >= 2 and token not in self.specials:
            grams = list(_grams_through(self.ids, self.usable, pos, self.n))
            return not (any(token in self.index.get(key,
                                                    ()) for key in grams) or _repeats_itself(grams, token))
        return True

    def accept(self, pos: int, token: int) -> None:
        self.now[pos] = token
        self.ids[pos] = token
        if token in self.specials or self.n < 2:
            return
        self.usable[pos] = True
        for j, others in _grams_through(self.ids, self.usable, pos, self.n):
            _add_gram(self.index, others[:j] + (token,) + others[j:])


def _grams_through(ids: list[int], usable: list[bool], pos: int, n: int) -> Iterator[tuple[int, tuple]]:
    """``(offset j, the other n-1 tokens)`` of every n-gram through ``pos`` whose other tokens are all
    known."""
    w = len(ids)
    for j in range(n):
        start = pos - j
        if start < 0 or start + n > w:
            continue
        others = [p for p in range(start, start + n) if p != pos]
        if all(usable[p] for p in others):
            yield j, tuple(ids[p] for p in others)


def _repeats_itself(grams: list[tuple[int, tuple]], token: int) -> bool:
    """Whether placing ``token`` makes two of the n-grams through the slot equal."""
    full = [others[:j] + (token,) + others[j:] for j, others in grams]
    return len(set(full)) < len(full)


def _add_gram(index: dict[tuple, set[int]], gram: tuple) -> None:
    for j in range(len(gram)):
        index.setdefault((j, gram[:j] + gram[j + 1 :]), set()).add(gram[j])


def _ngram_index(ids: list[int], usable: list[bool], n: int) -> dict[tuple, set[int]]:
    """``(offset j, the n-gram without its j-th token) -> {j-th tokens}`` over the row's complete n-grams."""
    index: dict[tuple, set[int]] = {}
    run = 0
    for end in range(len(ids)):
        run = run + 1 if usable[end] else 0
        if run >= n:
            _add_gram(index, tuple(ids[end - n + 1 : end + 1]))
    return index


PROCESSORS: dict[str, type[LogitsProcessor]] = {
    "eos": EosPolicy,
    "repetition": RepetitionGuard,
    "suppress": SuppressTokens,
}


def resolve_processor(spec: Any) -> LogitsProcessor:
    """A processor from a registry name, a ``{"name": ..., **kwargs}`` mapping, or an instance."""
    if isinstance(spec, LogitsProcessor):
        return spec
    kwargs: dict[str, Any] = {}
    if isinstance(spec, dict):
        kwargs = dict(spec)
        spec = kwargs.pop("name", None)
    if isinstance(spec, str):
        cls: Optional[type[LogitsProcessor]] = PROCESSORS.get(spec.strip().lower())
        if cls is None:
            raise ConfigError(f"unknown logits processor {spec!r}; valid names: {', '.join(PROCESSORS)}")
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise ConfigError(f"bad arguments for logits processor {spec!r}: {err}") from None
    raise ConfigError(
        f"logits processor must be a name ({', '.join(PROCESSORS)}) or a LogitsProcessor instance, got "
        f"{type(spec).__name__}"
    )
