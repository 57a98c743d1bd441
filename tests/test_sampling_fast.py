"""The vectorised sampling step gives the ids of the plain per-row step (CPU, toy denoisers).

The toys build each row's logits from that row alone, with exact float arithmetic that does not
depend on the batch, so both paths see bitwise-identical logits and exact equality of the ids is the
right check: every decision after the forward (processors, proposer, scorer, selector, commit, EOS
stop) must be the same rule.
"""

from __future__ import annotations

import pytest
import torch

from diffusion_lm.sampling import (
    BlockWindow,
    EosPolicy,
    RepetitionGuard,
    SampleProposer,
    SamplerConfig,
    ScheduleSelector,
    ThresholdSelector,
    generate,
    infill,
)
from diffusion_lm.sampling.context import StepContext
from diffusion_lm.sampling.fast import supports
from diffusion_lm.sampling import ngrams
from diffusion_lm.sampling.ngrams import ngram_allowed, ngram_bans
from diffusion_lm.sampling.processors import _RepetitionChecker
from tests.test_sampling import (
    EOS,
    MASK,
    PAD,
    SPECIAL,
    V,
    EosLoverToy,
    LoopToy,
    ScriptedToy,
    TableToy,
    prompt,
)


pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [prompt(7, 8), prompt(9, 10, 11, 12, 13, 14), prompt(15), prompt(16, 17, 18, 19), prompt(6, 6)]

SAMPLERS = {
    "greedy": SamplerConfig.preset("greedy"),
    "fast": SamplerConfig.preset("fast"),
    "quality": SamplerConfig.preset("quality"),
    "greedy-block4-steps": SamplerConfig.preset("greedy", window=BlockWindow(4),
                                                selector=ScheduleSelector(steps=6)),
    "threshold-low": SamplerConfig.preset("fast", selector=ThresholdSelector(0.05)),
    "sample-threshold-bigram": SamplerConfig(
        proposer=SampleProposer(temperature=1.0, top_k=12, top_p=0.95), window=BlockWindow(6),
        selector=ThresholdSelector(0.2), processors=[EosPolicy(), RepetitionGuard(ngram_size=2)]),
    "full-window-no-processors": SamplerConfig(proposer="greedy", window="full", selector=ScheduleSelector(),
                                               processors=[]),
    "margin-steps": SamplerConfig(proposer="greedy", scorer="margin", window=BlockWindow(5),
                                  selector=ScheduleSelector(steps=4),
                                  processors=["eos", RepetitionGuard(penalty=0.0, ngram_size=3)]),
}
TOYS = {"table": TableToy, "loop": LoopToy, "scripted": ScriptedToy, "eos": EosLoverToy}


def _both(toy_cls, sampler: SamplerConfig, **kwargs):
    fast = generate(toy_cls(), PROMPTS, sampler=sampler, seed=3, **SPECIAL, **kwargs)
    plain = generate(toy_cls(), PROMPTS, sampler=sampler.replace(vectorized=False), seed=3, **SPECIAL,
                     **kwargs)
    return fast, plain


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("toy", sorted(TOYS))
def test_fast_step_gives_the_plain_steps_ids(name, toy):
    sampler = SAMPLERS[name]
    assert supports(sampler, sampler.logits_processors(), False)
    fast, plain = _both(TOYS[toy], sampler, canvas_length=14)
    assert fast.sequences == plain.sequences
    assert fast.ids == plain.ids
    assert [(s.nfe, s.tokens) for s in fast.row_stats] == [(s.nfe, s.tokens) for s in plain.row_stats]
    assert (fast.stats.nfe, fast.stats.row_forwards, fast.stats.tokens) == \
        (plain.stats.nfe, plain.stats.row_forwards, plain.stats.tokens)


def test_fast_step_batched_equals_one_by_one_and_reports_steps():
    sampler = SAMPLERS["sample-threshold-bigram"]
    batched = generate(TableToy(), PROMPTS, canvas_length=12, sampler=sampler, seed=7, **SPECIAL)
    single = generate(TableToy(), PROMPTS, canvas_length=12, sampler=sampler, seed=7, max_batch_size=1,
                      **SPECIAL)
    assert batched.ids == single.ids
    seen: list[tuple[list[int], int]] = []
    hooked = generate(TableToy(), PROMPTS, canvas_length=12, sampler=sampler, seed=7,
                      on_step=lambda rows, ids: seen.append((rows, sum(r.count(MASK) for r in ids))),
                      **SPECIAL)
    assert hooked.ids == batched.ids and len(seen) == batched.stats.nfe and seen[-1][1] == 0


def test_infill_fast_equals_plain():
    rows = [[3, 7, MASK, MASK, 9, MASK, 4], [3, MASK, 8, MASK, MASK, MASK, 10, 11, 4]]
    for name in ("greedy", "fast", "quality"):
        sampler = SAMPLERS[name]
        fast = infill(LoopToy(), rows, sampler=sampler, seed=1, **SPECIAL)
        plain = infill(LoopToy(), rows, sampler=sampler.replace(vectorized=False), seed=1, **SPECIAL)
        assert fast.ids == plain.ids


def test_plain_step_is_used_where_the_fast_one_does_not_apply():
    base = SamplerConfig.preset("greedy")
    assert supports(base, base.logits_processors(), False)
    assert not supports(base, base.logits_processors(), True)  # trajectories
    assert not supports(base.replace(vectorized=False), base.logits_processors(), False)
    assert not supports(base.replace(remasker="remdm"), base.logits_processors(), False)
    assert not supports(base.replace(scorer="random"), base.logits_processors(), False)
    assert SamplerConfig.from_dict(base.replace(vectorized=False).to_dict()).vectorized is False


def _random_state(seed: int, b: int = 3, w: int = 14):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 9, (b, w), generator=g)  # a small alphabet: many repeats
    masked = torch.rand(b, w, generator=g) < 0.4
    ids[masked] = MASK
    ids[:, -1] = torch.where(torch.rand(b, generator=g) < 0.3, EOS, ids[:, -1])
    return ids, ~masked & (ids != EOS) & (ids != PAD), masked


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("n", [2, 3])
def test_ngram_tensor_rules_equal_the_reference(n, dense, monkeypatch):
    if dense:  # the fallback for codes that would not fit in int64 (long n-grams, huge vocabularies)
        monkeypatch.setattr(ngrams, "_fits", lambda *args: False)
    for seed in range(12):
        ids, usable, masked = _random_state(seed)
        rows, pos = masked.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        guard = RepetitionGuard(penalty=0.0, ngram_size=n, no_adjacent_duplicates=False)
        region = torch.ones_like(masked)
        ctx = StepContext(ids=ids, attention_mask=torch.ones_like(ids), editable=masked, masked=masked,
                          region=region, query=masked, q_rows=rows, q_pos=pos, mask_id=MASK, eos_id=EOS,
                          pad_id=PAD, generators=[], ids_cpu=ids, region_cpu=region, known_cpu=~masked)
        reference = torch.isneginf(guard._block_ngrams(torch.zeros(rows.numel(), V), ctx))
        assert torch.equal(ngram_bans(ids, usable, rows, pos, n, V), reference)
        tokens = torch.arange(V).repeat(rows.numel())
        r_all, p_all = rows.repeat_interleave(V), pos.repeat_interleave(V)
        allowed = ngram_allowed(ids, usable, r_all, p_all, tokens, n, (EOS, PAD))
        for i in range(0, r_all.numel(), 7):  # the same-step checker's rule, against its own index
            checker = _RepetitionChecker(guard, ids[r_all[i]].tolist(), usable[r_all[i]].tolist(), EOS, PAD)
            assert bool(allowed[i]) == checker.allows(int(p_all[i]), int(tokens[i]))
