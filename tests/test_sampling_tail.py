"""The padded tail: content tokens proposed where the model expects filler must rank last."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lm.sampling import SamplerConfig, generate

MASK, EOS, PAD, JUNK, V = 0, 1, 2, 9, 16
ANSWER = [5, 6, 7]


def tail_loving_denoiser(prompt_len: int, tail_pad: float = 0.9):
    """Answer slots predict ANSWER with p~0.6; the slot after it EOS/PAD; later slots PAD ``tail_pad``,
    the rest JUNK and a little EOS."""

    def denoiser(input_ids, attention_mask, query):
        rows, cols = query.nonzero(as_tuple=True)
        logits = torch.full((len(rows), V), -30.0)
        for n, c in enumerate(cols.tolist()):
            slot = c - prompt_len
            if slot < len(ANSWER):
                probs = {ANSWER[slot]: 0.6, 10 + slot: 0.4}
            elif slot == len(ANSWER):
                probs = {EOS: 0.5, PAD: 0.45, JUNK: 0.05}
            else:
                probs = {PAD: tail_pad, JUNK: (1 - tail_pad) * 0.9, EOS: (1 - tail_pad) * 0.1}
            for tok, p in probs.items():
                logits[n, tok] = math.log(p)
        logits[:, MASK] = float("-inf")
        return logits

    return denoiser


@pytest.mark.parametrize("tail_pad", [0.9, 0.999])
def test_tail_junk_is_never_committed_before_the_answer_ends(tail_pad):
    # With a near-certain pad tail, EOS+pad mass there must not let EOS land in the tail: that would
    # force content into every slot before it (a long junk answer instead of the short one).
    prompt = [3, 4, 4, 3]
    config = SamplerConfig(proposer="greedy", window="full", selector={"name": "schedule", "steps": 12},
                           processors=["eos"])
    result = generate(tail_loving_denoiser(len(prompt), tail_pad), [prompt], mask_id=MASK, eos_id=EOS,
                      pad_id=PAD, canvas_length=12, sampler=config, seed=0)
    assert result.ids[0] == ANSWER
    # EOS was committed right after the answer and the row stopped: no forward was spent on the tail
    assert result.row_stats[0].nfe == len(ANSWER) + 1
