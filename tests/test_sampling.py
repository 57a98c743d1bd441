"""The sampler against toy denoisers (CPU, tiny, deterministic)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lm.errors import ConfigError
from diffusion_lm.sampling import (
    BlockWindow,
    EntropyScorer,
    EosPolicy,
    FullWindow,
    GreedyProposer,
    MarginScorer,
    ProbabilityScorer,
    RemdmRemasker,
    RepetitionGuard,
    SampleProposer,
    SamplerConfig,
    ScheduleSelector,
    ThresholdSelector,
    generate,
    infill,
    longest_run,
    parse_spans,
    render_trajectory_html,
    render_trajectory_text,
    repeated_ngram_rate,
    schedule_counts,
    spans_to_ids,
    truncated_log_probs,
)

PAD, EOS, MASK, BOS, SEP = 0, 1, 2, 3, 4
FIRST_CONTENT = 5
V = 40
SPECIAL = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------- toy denoisers
def _known(ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    return attn.bool() & (ids != MASK)


def _nearest(known: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest known position strictly left / right of each position (-1 / L if none)."""
    b, L = known.shape
    pos = torch.arange(L).expand(b, L)
    left = torch.where(known, pos, torch.full_like(pos, -1)).cummax(1).values
    left = torch.cat([torch.full((b, 1), -1), left[:, :-1]], dim=1)
    right = torch.where(known, pos, torch.full_like(pos, L)).flip(1).cummin(1).values.flip(1)
    right = torch.cat([right[:, 1:], torch.full((b, 1), L)], dim=1)
    return left, right


def _canvas_start(ids: torch.Tensor) -> torch.Tensor:
    """Prompts end with SEP (the 'assistant header'): the canvas starts right after it."""
    return (ids == SEP).long().argmax(dim=1) + 1


class Toy:
    """Base: builds ``[B, L, V]`` logits row by row (so results cannot depend on batch neighbours),
    returns them at ``query``, records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def full(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        assert ids.dtype == torch.long and attn.dtype == torch.long and query.dtype == torch.bool
        assert not (query & (ids != MASK)).any(), "queried a slot that is not masked"
        self.calls.append((ids.clone(), attn.clone(), query.clone()))
        logits = self.full(ids, attn).float()
        logits[..., MASK] = float("-inf")
        return logits[query]


class TableToy(Toy):
    """Logits from a fixed random table indexed by position and by the nearest known token to the left."""

    def __init__(self, scale: float = 1.5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pos_table = torch.randn(64, V, generator=g) * scale
        self.tok_table = torch.randn(V, V, generator=g) * scale
        self.pos_table[:, EOS] -= 8.0  # rows fill their whole canvas
        self.pos_table[:, PAD] -= 8.0

    def full(self, ids, attn):
        left, _ = _nearest(_known(ids, attn))
        prev = torch.where(left >= 0, ids.gather(1, left.clamp_min(0)), torch.zeros_like(left))
        return self.pos_table[: ids.shape[1]][None] + self.tok_table[prev]


class ScriptedToy(Toy):
    """Row answer = a fixed script whose length is encoded by the prompt's first content token:
    target token at canvas slot j < m (confidence falling with j), EOS at j = m, pad after."""

    @staticmethod
    def target(prompt: list[int]) -> list[int]:
        m = prompt[1] - FIRST_CONTENT
        return [FIRST_CONTENT + (prompt[1] + 7 * j) % 30 for j in range(m)]

    def full(self, ids, attn):
        b, L = ids.shape
        out = torch.zeros(b, L, V)
        starts = _canvas_start(ids).tolist()
        for r in range(b):
            script = self.target(ids[r].tolist())
            for i in range(starts[r], L):
                j = i - starts[r]
                tok = script[j] if j < len(script) else (EOS if j == len(script) else PAD)
                out[r, i, tok] = 6.0 - 0.1 * j
        return out


class EosLoverToy(Toy):
    """EOS grows more likely the farther a slot is from decoded context, up to p ~ 0.5, where it is
    every tail slot's best guess (a model unsure of the answer length); content is a script up to
    ``length`` tokens, then weak."""

    def __init__(self, length: int = 10) -> None:
        super().__init__()
        self.length = length

    def full(self, ids, attn):
        b, L = ids.shape
        known = _known(ids, attn)
        left, right = _nearest(known)
        pos = torch.arange(L).expand(b, L)
        dist = torch.minimum(pos - left, torch.where(right < L, right - pos, torch.full_like(pos, 10 * L)))
        j = pos - _canvas_start(ids)[:, None]
        out = torch.zeros(b, L, V)
        content = FIRST_CONTENT + (j.clamp_min(0) * 3) % (V - FIRST_CONTENT)
        out.scatter_(2, content[..., None], torch.where(j < self.length, 3.0, -2.0)[..., None])
        out[..., EOS] = dist.float().clamp_max(4.0)
        return out


class LoopToy(Toy):
    """A 'looping' model: prefers copying the nearest known content token on either side, or a
    frequent token; a little position noise on top."""

    FREQUENT = 5

    def __init__(self) -> None:
        super().__init__()
        self.noise = torch.randn(64, V, generator=torch.Generator().manual_seed(1)) * 0.5

    def full(self, ids, attn):
        b, L = ids.shape
        left, right = _nearest(_known(ids, attn) & (ids >= FIRST_CONTENT))
        out = self.noise[:L][None].repeat(b, 1, 1)
        out[..., self.FREQUENT] += 2.5
        out[..., EOS] = -10.0
        out[..., PAD] = -10.0
        for idx, ok in ((left, left >= 0), (right, right < L)):
            tok = ids.gather(1, idx.clamp(0, L - 1))
            bonus = torch.where(ok, 3.0, 0.0)
            out.scatter_add_(2, tok[..., None], bonus[..., None])
        return out


def prompt(*content: int) -> list[int]:
    return [BOS, *content, SEP]


def committed_per_step(result, row: int = 0) -> list[int]:
    return [len(s.committed) for s in result.trajectories[row].steps]


# --------------------------------------------------------------------------------------- batching
def test_batched_equals_one_by_one_and_no_left_padding():
    prompts = [prompt(7, 8), prompt(9, 10, 11, 12, 13, 14), prompt(15), prompt(16, 17, 18, 19)]
    sampler = SamplerConfig(
        proposer=SampleProposer(temperature=1.0, top_k=12, top_p=0.95),
        window=BlockWindow(4),
        selector=ThresholdSelector(0.4),
        remasker=RemdmRemasker(probability=0.5, budget=2, max_confidence=1.0),
    )
    toy = TableToy()
    batched = generate(toy, prompts, canvas_length=10, sampler=sampler, seed=11, **SPECIAL)
    for ids, attn, _ in toy.calls:  # right padding only: each row is a prefix of ones
        assert torch.equal(attn, (attn.cumsum(1) == torch.arange(1, attn.shape[1] + 1)).long())
    single = generate(TableToy(), prompts, canvas_length=10, sampler=sampler, seed=11, max_batch_size=1,
                      **SPECIAL)
    pairs = generate(TableToy(), prompts, canvas_length=10, sampler=sampler, seed=11, max_batch_size=3,
                     **SPECIAL)
    assert batched.ids == single.ids == pairs.ids
    assert batched.sequences == single.sequences
    assert [s.nfe for s in batched.row_stats] == [s.nfe for s in single.row_stats]
    assert len({tuple(a) for a in batched.ids}) == len(prompts)
    # Greedy decoding has no randomness: each prompt alone gives the same answer as in the batch.
    greedy = SamplerConfig.preset("greedy", window="full")
    together = generate(TableToy(), prompts, canvas_length=10, sampler=greedy, **SPECIAL)
    for p, ids in zip(prompts, together.ids):
        assert generate(TableToy(), [p], canvas_length=10, sampler=greedy, **SPECIAL).ids[0] == ids


def test_seed_reproducibility():
    prompts = [prompt(7, 8, 9), prompt(10)]
    sampler = SamplerConfig(proposer=SampleProposer(temperature=1.0), selector=ThresholdSelector(0.5))
    a = generate(TableToy(), prompts, canvas_length=12, sampler=sampler, seed=5, **SPECIAL)
    b = generate(TableToy(), prompts, canvas_length=12, sampler=sampler, seed=5, **SPECIAL)
    c = generate(TableToy(), prompts, canvas_length=12, sampler=sampler, seed=6, **SPECIAL)
    assert a.ids == b.ids and a.seed == 5
    assert a.ids != c.ids
    fresh = generate(TableToy(), prompts, canvas_length=12, sampler=sampler, seed=None, **SPECIAL)
    again = generate(TableToy(), prompts, canvas_length=12, sampler=sampler, seed=fresh.seed, **SPECIAL)
    assert fresh.ids == again.ids


def test_per_row_seeds_make_each_answer_independent_of_its_batch():
    prompts = [prompt(7, 8), prompt(9, 10, 11), prompt(7, 8), prompt(12)]
    seeds = [11, 5, 11, 2**63 + 3]
    sampler = SamplerConfig(proposer=SampleProposer(temperature=1.0, top_k=12), window=BlockWindow(4),
                            selector=ThresholdSelector(0.4), remasker=RemdmRemasker(probability=0.5, budget=2,
                                                                                     max_confidence=1.0))
    batched = generate(TableToy(), prompts, canvas_length=10, sampler=sampler, seed=seeds, **SPECIAL)
    assert batched.seed == seeds
    assert batched.ids[0] == batched.ids[2]  # same prompt, same seed: same answer wherever it sits
    for p, s, ids, stats in zip(prompts, seeds, batched.ids, batched.row_stats):
        alone = generate(TableToy(), [p], canvas_length=10, sampler=sampler, seed=s, **SPECIAL)
        assert alone.ids[0] == ids and alone.row_stats[0].nfe == stats.nfe
    chunked = generate(TableToy(), prompts, canvas_length=10, sampler=sampler, seed=seeds, max_batch_size=3,
                       **SPECIAL)
    assert chunked.ids == batched.ids
    rows = [[BOS, 7, MASK, MASK, 9], [BOS, MASK, MASK, MASK, 10]]
    filled = infill(TableToy(), rows, sampler=sampler, seed=[4, 8], **SPECIAL)
    assert [infill(TableToy(), [r], sampler=sampler, seed=s, **SPECIAL).ids[0]
            for r, s in zip(rows, [4, 8])] == filled.ids
    with pytest.raises(ConfigError, match="2 seeds for 4 rows"):
        generate(TableToy(), prompts, seed=[1, 2], **SPECIAL)
    with pytest.raises(ConfigError, match="seed must be an int"):
        generate(TableToy(), prompts, seed="7", **SPECIAL)


def test_on_step_reports_every_forward_with_the_current_rows():
    lengths = [1, 3, 6]
    prompts = [prompt(FIRST_CONTENT + m, 20) for m in lengths]
    sampler = SamplerConfig(proposer="greedy", window="full", selector=ThresholdSelector(1.5),
                            processors=["eos"])
    reports: list[tuple[list[int], list[list[int]]]] = []
    toy = ScriptedToy()
    result = generate(toy, prompts, canvas_length=10, sampler=sampler, max_batch_size=2,
                      on_step=lambda rows, ids: reports.append((list(rows), [list(r) for r in ids])),
                      **SPECIAL)
    assert result.ids == generate(ScriptedToy(), prompts, canvas_length=10, sampler=sampler, **SPECIAL).ids
    # One report per denoiser call, naming the rows (indices into prompts) that took part in it.
    assert [len(rows) for rows, _ in reports] == [ids.shape[0] for ids, _, _ in toy.calls]
    assert [rows for rows, _ in reports] == [[0, 1]] * 2 + [[1]] * 2 + [[2]] * 7  # chunks of 2 rows
    for i, p in enumerate(prompts):
        seen = [ids[rows.index(i)] for rows, ids in reports if i in rows]
        assert len(seen) == result.row_stats[i].nfe == lengths[i] + 1
        masks = [row.count(MASK) for row in seen]
        assert masks == sorted(masks, reverse=True) and masks[-1] == 0 and all(m > 0 for m in masks[:-1])
        assert all(row[: len(p)] == p and len(row) == len(p) + 10 for row in seen)
        assert seen[-1] == result.sequences[i]  # the last report is the finished row
    # Infill reports holes being filled; a row without holes is never reported.
    rows = [[BOS, 7, MASK, MASK, 9], [BOS, 7, 8], [BOS, MASK, 10]]
    infill_reports: list[list[int]] = []
    infill(TableToy(), rows, sampler="greedy", on_step=lambda r, ids: infill_reports.append(list(r)),
           **SPECIAL)
    assert infill_reports and all(1 not in r for r in infill_reports)

    class Stop(Exception):
        pass

    def abort(rows, ids):
        raise Stop()

    with pytest.raises(Stop):  # a hook may abort the call (e.g. every requester has gone)
        generate(ScriptedToy(), prompts, canvas_length=10, sampler=sampler, on_step=abort, **SPECIAL)


def test_finished_rows_are_not_passed_to_the_denoiser_again():
    lengths = [1, 3, 6]
    prompts = [prompt(FIRST_CONTENT + m, 20) for m in lengths]
    toy = ScriptedToy()
    sampler = SamplerConfig(proposer="greedy", window="full", selector=ThresholdSelector(1.5),
                            processors=["eos"])
    result = generate(toy, prompts, canvas_length=10, sampler=sampler, **SPECIAL)
    assert result.ids == [ScriptedToy.target(p) for p in prompts]
    assert [s.nfe for s in result.row_stats] == [m + 1 for m in lengths]  # m tokens, then EOS
    assert [ids.shape[0] for ids, _, _ in toy.calls] == [3, 3, 2, 2, 1, 1, 1]
    assert result.stats.nfe == 7 and result.stats.row_forwards == sum(m + 1 for m in lengths)
    finished_at = {p[1]: m + 1 for p, m in zip(prompts, lengths)}
    for call, (ids, _, _) in enumerate(toy.calls):
        for key in ids[:, 1].tolist():
            assert call < finished_at[key], f"row {key} was computed after it finished"
    assert result.sequences[0][-9:] == [EOS] + [PAD] * 8  # rest of the canvas filled with pad


# --------------------------------------------------------------------------------------- selectors
def test_threshold_above_every_confidence_commits_one_token_per_step():
    sampler = SamplerConfig(proposer="greedy", window="full", selector=ThresholdSelector(1.0), processors=[])
    result = generate(TableToy(), [prompt(7, 8), prompt(9)], canvas_length=9, sampler=sampler,
                      return_trajectory=True, seed=0, **SPECIAL)
    for row in range(2):
        assert committed_per_step(result, row) == [1] * 9
        assert result.row_stats[row].nfe == 9
    # The other extreme: threshold 0 commits a whole block per forward.
    zero = SamplerConfig(proposer="greedy", window=BlockWindow(3), selector=ThresholdSelector(0.0),
                         processors=[])
    result = generate(TableToy(), [prompt(7)], canvas_length=9, sampler=zero, return_trajectory=True,
                      **SPECIAL)
    assert committed_per_step(result) == [3, 3, 3]


def test_schedule_counts_formula():
    assert schedule_counts(20, 6) == [3, 3, 4, 3, 3, 4]  # floor(n*s/S) - floor(n*(s-1)/S)
    assert schedule_counts(5, 5) == [1] * 5
    for n, s in [(7, 3), (64, 64), (33, 8), (1, 1)]:
        counts = schedule_counts(n, s)
        assert sum(counts) == n and len(counts) == s
        assert max(counts) - min(counts) <= 1


def test_schedule_selector_commits_exactly_the_scheduled_counts():
    full = SamplerConfig(proposer="greedy", window="full", selector=ScheduleSelector(steps=6), processors=[])
    result = generate(TableToy(), [prompt(7, 8)], canvas_length=20, sampler=full, return_trajectory=True,
                      **SPECIAL)
    assert committed_per_step(result) == schedule_counts(20, 6)
    # Blocks of 8, 8, 4 share the 6 steps in proportion: ceil(6*8/20) = 3, 3, then ceil(6*4/20) = 2.
    block = full.replace(window=BlockWindow(8))
    result = generate(TableToy(), [prompt(7, 8)], canvas_length=20, sampler=block, return_trajectory=True,
                      **SPECIAL)
    assert committed_per_step(result) == schedule_counts(8, 3) * 2 + schedule_counts(4, 2)
    # Even when the repetition guard would rather skip an adjacent duplicate, the counts hold.
    loop = full.replace(processors=[RepetitionGuard()])
    result = generate(LoopToy(), [prompt(7, 8)], canvas_length=20, sampler=loop, return_trajectory=True,
                      **SPECIAL)
    assert committed_per_step(result) == schedule_counts(20, 6)


def test_block_window_never_commits_outside_the_current_block():
    block, canvas = 5, 17
    sampler = SamplerConfig(proposer="sample", window=BlockWindow(block), selector=ThresholdSelector(0.2),
                            processors=[])
    p = prompt(7, 8, 9)
    result = generate(TableToy(), [p], canvas_length=canvas, sampler=sampler, return_trajectory=True, seed=3,
                      **SPECIAL)
    start, done, current = len(p), set(), 0
    for step in result.trajectories[0].steps:
        blocks = {(pos - start) // block for pos, _ in step.committed}
        assert blocks == {current}, f"step {step.forward} committed in blocks {blocks}, current {current}"
        done |= {pos for pos, _ in step.committed}
        if all(start + current * block + i in done for i in range(min(block, canvas - current * block))):
            current += 1
    assert current == math.ceil(canvas / block)


# ------------------------------------------------------------------------------------ processors
def test_repetition_guard_lowers_repeated_ngrams_on_a_looping_model():
    prompts = [prompt(6 + i, 20 + i, 30 + i) for i in range(4)]
    base = SamplerConfig(proposer="greedy", window=BlockWindow(8), selector=ThresholdSelector(0.5),
                         processors=[])
    guarded = base.replace(processors=[RepetitionGuard(penalty=2.0, window=8, ngram_size=2)])
    loose = generate(LoopToy(), prompts, canvas_length=24, sampler=base, **SPECIAL)
    tight = generate(LoopToy(), prompts, canvas_length=24, sampler=guarded, **SPECIAL)
    rate = lambda r, n: sum(repeated_ngram_rate(a, n) for a in r.ids) / len(r.ids)  # noqa: E731
    assert rate(loose, 2) > 0.6, rate(loose, 2)
    assert rate(tight, 2) < rate(loose, 2) - 0.4, (rate(loose, 2), rate(tight, 2))
    assert rate(tight, 2) == 0.0  # bigram blocking is exact
    assert max(longest_run(a) for a in tight.ids) <= 2 < min(longest_run(a) for a in loose.ids)


def test_no_adjacent_duplicates_in_one_step_both_directions():
    class SameToken(Toy):
        def full(self, ids, attn):
            out = torch.zeros(*ids.shape, V)
            out[..., 9] = 8.0
            return out

    rule = RepetitionGuard(penalty=0.0, ngram_size=0, no_adjacent_duplicates=True)
    sampler = SamplerConfig(proposer="greedy", window="full", selector=ThresholdSelector(0.0),
                            processors=[rule])
    result = generate(SameToken(), [prompt(7)], canvas_length=8, sampler=sampler, return_trajectory=True,
                      **SPECIAL)
    for step in result.trajectories[0].steps:
        positions = sorted(pos for pos, _ in step.committed)
        assert all(b - a > 1 for a, b in zip(positions, positions[1:])), positions
    assert committed_per_step(result) == [4, 4]  # every other slot, then the rest
    off = sampler.replace(processors=[])
    assert committed_per_step(generate(SameToken(), [prompt(7)], canvas_length=8, sampler=off,
                                       return_trajectory=True, **SPECIAL)) == [8]


def test_eos_policy_prevents_eos_flooding():
    toy_len, canvas = 10, 24
    p = prompt(7, 8)
    plain = SamplerConfig(proposer="greedy", window="full", selector=ScheduleSelector(), processors=[])
    flooded = generate(EosLoverToy(toy_len), [p], canvas_length=canvas, sampler=plain, **SPECIAL)
    policed = generate(EosLoverToy(toy_len), [p], canvas_length=canvas,
                       sampler=plain.replace(processors=["eos"]), **SPECIAL)
    expected = [FIRST_CONTENT + (j * 3) % (V - FIRST_CONTENT) for j in range(toy_len)]
    assert len(flooded.ids[0]) < toy_len // 2  # EOS won the ranking in the tail and cut the answer
    assert policed.ids[0] == expected  # EOS only at the frontier: exactly at the end of the answer
    assert policed.sequences[0][len(p) + toy_len:] == [EOS] + [PAD] * (canvas - toy_len - 1)
    assert policed.row_stats[0].nfe == toy_len + 1  # stopped at EOS: the tail was never decoded


def test_suppressed_tokens_are_never_proposed():
    sampler = SamplerConfig(proposer="sample", window="full", selector=ThresholdSelector(0.3), processors=[],
                            suppress_tokens=list(range(FIRST_CONTENT, 30)))
    result = generate(TableToy(), [prompt(7), prompt(8, 9)], canvas_length=12, sampler=sampler, seed=1,
                      **SPECIAL)
    assert not any(FIRST_CONTENT <= t < 30 for a in result.ids for t in a)
    assert all(len(a) == 12 for a in result.ids)


# ------------------------------------------------------------------------------------ infilling
def test_infill_leaves_every_non_mask_token_untouched():
    rows = [[BOS, 7, MASK, MASK, 9, 10, MASK, 11], [BOS, MASK, 12, MASK, MASK, MASK, 13, 14, 15, MASK]]
    toy = LoopToy()
    result = infill(toy, rows, sampler="quality", seed=2, return_trajectory=True, **SPECIAL)
    for row, out in zip(rows, result.ids):
        assert len(out) == len(row) and MASK not in out
        assert all(o == t for o, t in zip(out, row) if t != MASK)
    for ids, _, query in toy.calls:  # only holes are ever queried
        assert (ids[query] == MASK).all()
    assert [s.nfe for s in result.row_stats] == [3, 5]  # the quality preset: one slot per forward
    untouched = infill(toy, [[BOS, 7, 8]], **SPECIAL)
    assert untouched.ids == [[BOS, 7, 8]] and untouched.row_stats[0].nfe == 0


def test_span_syntax():
    assert parse_spans("Hi [[MASK]] there [[MASK:3]]") == [("text", "Hi "), ("mask", 8), ("text", " there "),
                                                           ("mask", 3)]
    assert parse_spans("[[ mask : 2 ]]", default_slots=4) == [("mask", 2)]
    assert parse_spans("no holes ]] here") == [("text", "no holes ]] here")]
    tokenize = lambda s: [FIRST_CONTENT + len(w) for w in s.split()]  # noqa: E731
    assert spans_to_ids("ab [[MASK:2]] cde", tokenize, MASK) == [7, MASK, MASK, 8]
    with pytest.raises(ValueError, match=r"invalid slot count 'x'.*position 2"):
        parse_spans("a [[MASK:x]] b")
    with pytest.raises(ValueError, match=r"position 0.*positive integer"):
        parse_spans("[[MASK:0]]")
    with pytest.raises(ValueError, match=r"unclosed '\[\[' at position 4"):
        parse_spans("abc [[MASK:3")
    with pytest.raises(ValueError, match=r"unknown span '\[\[FOO\]\]' at position 1"):
        parse_spans("x[[FOO]]")


# ------------------------------------------------------------------------------------ proposers / scorers
def test_sampling_is_float64_on_the_truncated_slice_only():
    logits = torch.randn(3, 1000)
    log_probs, token_ids = truncated_log_probs(logits, temperature=0.7, top_k=10, top_p=0.9)
    assert log_probs.dtype == torch.float64 and log_probs.shape == (3, 10)
    assert torch.equal(token_ids, logits.topk(10).indices)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    capped, _ = truncated_log_probs(logits, max_candidates=64)
    assert capped.shape == (3, 64)
    # Nucleus: the kept tokens are the smallest prefix whose mass reaches top_p.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    nucleus, _ = truncated_log_probs(probs, top_p=0.8)
    assert torch.isfinite(nucleus).tolist() == [[True, True, False, False]]
    # The Gumbel-max draw matches the distribution (temperature is not silently lowered).
    table = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(20000, 4).contiguous()

    class Ctx:
        rows_counts = [20000]
        generators = [torch.Generator().manual_seed(0)]

    draws = SampleProposer(temperature=1.0)(table, Ctx())
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert torch.allclose(freq, torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), atol=0.015)


def test_scorers_rank_on_untempered_probabilities():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    probs = logits.softmax(-1)
    top = torch.tensor([0, 1])
    assert torch.allclose(ProbabilityScorer()(logits, top, None), probs[[0, 1], [0, 1]])
    assert torch.allclose(MarginScorer()(logits, top, None),
                          torch.stack([probs[0, 0] - probs[0, 1], torch.tensor(0.0)]))
    assert torch.allclose(MarginScorer()(logits, torch.tensor([1, 1]), None)[0], probs[0, 1] - probs[0, 0])
    ent = EntropyScorer()(logits, top, None)
    assert ent[0] > ent[1] and torch.isclose(ent[1], torch.tensor(-math.log(3)))


def test_position_decay_decodes_next_to_context():
    sampler = SamplerConfig(proposer="greedy", scorer=ProbabilityScorer(position_decay=5.0), window="full",
                            selector=ScheduleSelector(), processors=[])
    p = prompt(7, 8)
    result = generate(TableToy(), [p], canvas_length=12, sampler=sampler, return_trajectory=True, **SPECIAL)
    known = set(range(len(p)))
    for step in result.trajectories[0].steps:
        (pos, _), = step.committed
        assert pos - 1 in known or pos + 1 in known
        known.add(pos)


def test_remdm_remasks_only_answer_tokens_within_budget():
    sampler = SamplerConfig(proposer="greedy", window=BlockWindow(6), selector=ScheduleSelector(steps=6),
                            remasker=RemdmRemasker(probability=1.0, max_per_step=2, budget=3,
                                                   max_confidence=1.0),
                            processors=[])
    prompts = [prompt(7, 8), prompt(9)]
    result = generate(TableToy(), prompts, canvas_length=12, sampler=sampler, return_trajectory=True,
                      **SPECIAL)
    for row, p in enumerate(prompts):
        remasked = [pos for s in result.trajectories[row].steps for pos in s.remasked]
        assert 0 < len(remasked) <= 3 == result.row_stats[row].remasked
        assert all(pos >= len(p) for pos in remasked)
        assert result.sequences[row][: len(p)] == p and MASK not in result.sequences[row]
        assert result.row_stats[row].nfe == 6  # re-opened slots ride on the next scheduled step
        assert result.row_stats[row].tokens == 12 + 3


# ------------------------------------------------------------------------------------ config, validation
def test_config_names_presets_and_roundtrip():
    fast = SamplerConfig.preset("fast")
    assert isinstance(fast.proposer, GreedyProposer) and fast.selector == ThresholdSelector(0.9)
    assert fast.window == BlockWindow(32)
    quality = SamplerConfig.preset("quality")
    assert isinstance(quality.proposer, SampleProposer) and quality.proposer.temperature == 0.7
    assert any(isinstance(p, EosPolicy) for p in quality.processors)
    assert any(isinstance(p, RepetitionGuard) for p in quality.processors)
    named = SamplerConfig(proposer="sample", scorer="margin", window="full", selector="threshold",
                          remasker="remdm", processors=["eos", {"name": "repetition", "ngram_size": 4}])
    assert isinstance(named.window, FullWindow) and named.processors[1].ngram_size == 4
    assert SamplerConfig.from_dict(named.to_dict()) == named
    assert SamplerConfig.coerce({"preset": "fast", "window": "full"}).window == FullWindow()


def test_input_validation_errors():
    toy = TableToy()
    with pytest.raises(ConfigError, match="canvas_length must be >= 1"):
        generate(toy, [prompt(7)], canvas_length=0, **SPECIAL)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        SamplerConfig(selector=ScheduleSelector(steps=0))
    with pytest.raises(ConfigError, match="non-empty list"):
        generate(toy, [], **SPECIAL)
    with pytest.raises(ConfigError,
                       match=r"prompt 1 has 5 tokens \+ canvas_length 64 = 69.*max_length 68.*lower "
                             r"canvas_length"):
        generate(toy, [prompt(7), prompt(7, 8, 9)], max_length=68, **SPECIAL)
    with pytest.raises(ConfigError, match=r"unknown proposer 'beam'; valid names: greedy, sample"):
        SamplerConfig(proposer="beam")
    with pytest.raises(ConfigError, match=r"unknown window 'sliding'; valid names: full, block"):
        SamplerConfig(window="sliding")
    with pytest.raises(ConfigError, match=r"valid names: eos, repetition, suppress"):
        SamplerConfig(processors=["nope"])
    with pytest.raises(ConfigError, match=r"valid presets: quality, fast, greedy"):
        SamplerConfig.preset("turbo")
    with pytest.raises(ConfigError, match="use infill"):
        generate(toy, [[BOS, MASK, SEP]], **SPECIAL)
    with pytest.raises(ValueError, match=r"expected \[N, V\]"):
        generate(lambda i, a, q: torch.zeros(1, V), [prompt(7)], canvas_length=4, **SPECIAL)


# ------------------------------------------------------------------------------------ views, metrics
def test_trajectory_views(tmp_path):
    sampler = SamplerConfig(proposer="greedy", window="full", selector=ScheduleSelector(steps=3),
                            processors=[])
    result = generate(TableToy(), [prompt(7)], canvas_length=6, sampler=sampler, return_trajectory=True,
                      **SPECIAL)
    traj = result.trajectories[0]
    vocab = {i: f"t{i}" for i in range(V)} | {FIRST_CONTENT: "<&>"}
    text = render_trajectory_text(traj, vocab)
    lines = text.splitlines()
    assert len(lines) == 1 + len(traj.steps) == 4
    assert lines[0].count("░") == 6 and lines[-1].count("░") == 0
    assert lines[1].count("[") == 2  # two tokens newly committed at step 1
    page = render_trajectory_html(result.trajectories, lambda ids: vocab[ids[0]], tmp_path / "t.html")
    assert (tmp_path / "t.html").read_text(encoding="utf-8") == page
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "<style>" in page
    assert page.count('class="step"') == 4 and page.count('class="new"') == 6 + 1  # + legend
    assert "<&>" not in page.split("</style>")[1] or "&lt;&amp;&gt;" in page
    assert traj.final(PAD) == result.sequences[0]


def test_repetition_metrics():
    assert repeated_ngram_rate([1, 2, 1, 2, 1, 2], 2) == pytest.approx(0.6)
    assert repeated_ngram_rate([1, 2, 3, 4], 2) == 0.0
    assert repeated_ngram_rate([1], 3) == 0.0
    assert longest_run([1, 1, 1, 2, 2]) == 3 and longest_run([]) == 0


def test_sampler_config_is_readable_by_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--sampler", type=SamplerConfig)
    default = parser.instantiate(parser.parse_args([])).sampler
    assert default == SamplerConfig.preset("quality")
    args = ["--sampler.proposer=greedy", "--sampler.selector=threshold", "--sampler.window=full",
            "--sampler.processors=[eos]"]
    config = parser.instantiate(parser.parse_args(args)).sampler
    assert config == SamplerConfig(proposer="greedy", selector="threshold", window="full", processors=["eos"])


def test_infill_from_span_text():
    words = {"the": 7, "cat": 8, "sat": 9}
    ids = spans_to_ids("the [[MASK:2]] cat [[MASK]] sat", lambda s: [words[w] for w in s.split()], MASK,
                       default_slots=3)
    assert ids == [7, MASK, MASK, 8, MASK, MASK, MASK, 9]
    result = infill(TableToy(), [ids], sampler="fast", seed=0, **SPECIAL)
    out = result.ids[0]
    assert [out[i] for i in (0, 3, 7)] == [7, 8, 9] and MASK not in out
