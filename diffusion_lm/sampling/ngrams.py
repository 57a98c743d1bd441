"""The repetition guard's n-gram rules as tensor ops (plain torch).

:class:`~diffusion_lm.sampling.processors.RepetitionGuard` bans, at a masked slot, every token that
would complete an n-gram already present in the answer, and every token that would make two n-grams
through the slot equal ("x [x] x" for n = 2). Its reference implementation walks each slot's n-grams
in Python dictionaries; these functions compute the same sets for all slots of all rows at once (the
vectorised sampling step, :mod:`~diffusion_lm.sampling.fast`, uses them). Shapes: ``ids``/``usable``
``[b, w]`` (usable = known answer text, not EOS or pad), one ``(rows, pos)`` pair per slot.
"""

from __future__ import annotations

import torch

__all__ = ["ngram_allowed", "ngram_bans"]


def _windows(ids: torch.Tensor, usable: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
             n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Around each ``(row, pos)``: the ``2n - 1`` tokens centred on it, whether each is usable
    context, and whether each lies inside the row."""
    w = ids.shape[1]
    span = pos[:, None] + torch.arange(-(n - 1), n, device=pos.device)[None, :]
    inside = (span >= 0) & (span < w)
    span = span.clamp(0, w - 1)
    r = rows[:, None].expand_as(span)
    return ids[r, span], usable[r, span] & inside, inside


def _grams(tokens: torch.Tensor, usable: torch.Tensor, inside: torch.Tensor,
           n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` n-grams through the centre slot (offset ``j``: the slot is the gram's ``j``-th
    token): ``[M, n(j), n(k)]`` tokens and ``[M, n]`` validity (the gram lies inside the row and its
    other tokens are usable), as ``_grams_through`` in ``processors.py``."""
    idx = (n - 1) - torch.arange(n, device=tokens.device)[:, None] + torch.arange(n, device=tokens.device)
    toks, ok, ins = tokens[:, idx], usable[:, idx], inside[:, idx]  # [M, j, k]
    centre = torch.eye(n, dtype=torch.bool, device=tokens.device)[None]
    valid = ins.all(dim=2) & (ok | centre).all(dim=2)
    return toks, valid


def _existing(ids: torch.Tensor, usable: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every complete n-gram of every row: ``[b, G, n]`` tokens and ``[b, G]`` validity."""
    grams = ids.unfold(1, n, 1)
    return grams, usable.unfold(1, n, 1).all(dim=2)


def _repeats(full: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``full [..., n(j), n(k)]`` grams through one slot with a token placed: whether two valid ones
    are equal (``_repeats_itself``)."""
    same = (full[..., :, None, :] == full[..., None, :, :]).all(dim=-1)  # [..., j1, j2]
    n = full.shape[-2]
    upper = torch.ones(n, n, dtype=torch.bool, device=full.device).triu(1)
    pair = valid[..., :, None] & valid[..., None, :] & upper
    return (same & pair).flatten(-2).any(dim=-1)


def _codes(lead: torch.Tensor, tokens: torch.Tensor, base: int) -> torch.Tensor:
    """Exact int64 codes of ``(lead, tokens[..., 0], tokens[..., 1], ...)`` (digits in base ``base``)."""
    code = lead.to(torch.int64)
    for c in range(tokens.shape[-1]):
        code = code * base + tokens[..., c]
    return code


def _fits(lead_bound: int, base: int, digits: int) -> bool:
    """Whether codes of ``digits`` tokens below ``base`` after a lead below ``lead_bound`` fit in int64."""
    return lead_bound * base**digits < 2**62


def _join(keys: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair ``(query index, key index)`` with equal values (a sort-merge join)."""
    ordered, perm = keys.sort()
    lo = torch.searchsorted(ordered, queries)
    count = torch.searchsorted(ordered, queries, right=True) - lo
    qi = torch.repeat_interleave(torch.arange(queries.numel(), device=keys.device), count)
    offset = torch.arange(qi.numel(), device=keys.device) - (count.cumsum(0) - count)[qi]
    return qi, perm[lo[qi] + offset]


def _present(ids: torch.Tensor, usable: torch.Tensor, rows: torch.Tensor, full: torch.Tensor,
             n: int) -> torch.Tensor:
    """``[M, j]`` whether each full n-gram ``full [M, j, k]`` already occurs in its row."""
    grams, gvalid = _existing(ids, usable, n)
    r_e, g_e = gvalid.nonzero(as_tuple=True)
    if r_e.numel() == 0:
        return torch.zeros(full.shape[:2], dtype=torch.bool, device=full.device)
    base = max(int(ids.max()), int(full.max())) + 1
    if not _fits(ids.shape[0], base, n):  # too many digits for int64 codes: compare densely
        g, gv = grams[rows], gvalid[rows]
        return ((full[:, :, None, :] == g[:, None, :, :]).all(dim=3) & gv[:, None, :]).any(dim=2)
    known = _codes(r_e, grams[r_e, g_e], base).sort().values
    query = _codes(rows[:, None].expand(full.shape[:2]), full, base)
    at = torch.searchsorted(known, query).clamp_max(known.numel() - 1)
    return known[at] == query


def ngram_allowed(ids: torch.Tensor, usable: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
                  tok: torch.Tensor, n: int, specials: tuple[int, int]) -> torch.Tensor:
    """``[M]`` whether placing ``tok`` at ``(rows, pos)`` breaks neither n-gram rule of the repetition
    guard given the state ``ids``/``usable`` ``[b, w]``: it completes no n-gram that already occurs,
    and makes no two n-grams through the slot equal (EOS and pad are always allowed)."""
    tokens, ok, inside = _windows(ids, usable, rows, pos, n)
    toks, valid = _grams(tokens, ok, inside, n)
    centre = torch.eye(n, dtype=torch.bool, device=ids.device)[None]
    full = torch.where(centre, tok[:, None, None], toks)  # [M, j, k]
    bad = (_present(ids, usable, rows, full, n) & valid).any(dim=1) | _repeats(full, valid)
    special = (tok == specials[0]) | (tok == specials[1])
    return ~bad | special


def ngram_bans(ids: torch.Tensor, usable: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor,
               n: int, vocab: int) -> torch.Tensor:
    """``[M, vocab]`` tokens the repetition guard's n-gram rule bans at each ``(rows, pos)``: every
    token that would complete an n-gram already in the row, and every token that would make two
    n-grams through the slot equal (as ``RepetitionGuard._block_ngrams``)."""
    m = rows.shape[0]
    ban = torch.zeros(m, vocab, dtype=torch.bool, device=ids.device)
    if m == 0 or ids.shape[1] < n:
        return ban
    tokens, ok, inside = _windows(ids, usable, rows, pos, n)
    toks, valid = _grams(tokens, ok, inside, n)  # [M, j, k], [M, j]
    centre = torch.eye(n, dtype=torch.bool, device=ids.device)  # [j, k]
    grams, gvalid = _existing(ids, usable, n)
    if _fits(ids.shape[0] * n, vocab, n - 1):
        # A gram completes (j, others) when it equals them everywhere but at offset j: join the keys
        # (row, j, the gram without its j-th token) of the row's grams and of the slot's.
        r_e, g_e = gvalid.nonzero(as_tuple=True)
        found = grams[r_e, g_e]  # [E, n]
        j_all = torch.arange(n, device=ids.device)
        others = found[:, None, :].expand(-1, n, -1)[:, ~centre].view(-1, n, n - 1)
        keys = _codes(r_e[:, None] * n + j_all, others, vocab).flatten()
        q_idx, q_j = valid.nonzero(as_tuple=True)
        q_others = toks[q_idx, q_j][~centre[q_j]].view(-1, n - 1)
        queries = _codes(rows[q_idx] * n + q_j, q_others, vocab)
        qi, ei = _join(keys, queries)
        ban[q_idx[qi], found.flatten()[ei]] = True
    else:  # too many digits for int64 codes: compare densely
        g, gv = grams[rows], gvalid[rows]  # [M, G, n]
        agree = (g[:, None, :, :] == toks[:, :, None, :]) | centre[None, :, None, :]  # [M, j, G, k]
        match = agree.all(dim=3) & gv[:, None, :] & valid[:, :, None]  # [M, j, G]
        q, j, gi = match.nonzero(as_tuple=True)
        ban[q, g[q, gi, j]] = True
    # Two grams through the slot made equal: the token must equal one of the window's other tokens.
    cand = torch.cat([tokens[:, : n - 1], tokens[:, n:]], dim=1)  # [M, 2n-2]
    full = torch.where(centre[None, None], cand[:, :, None, None], toks[:, None])  # [M, C, j, k]
    rep = _repeats(full, valid[:, None, :].expand(-1, cand.shape[1], -1))  # [M, C]
    qi, ci = rep.nonzero(as_tuple=True)
    ban[qi, cand[qi, ci]] = True
    return ban
