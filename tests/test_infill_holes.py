"""Infill holes: fixed-size holes are filled with text, variable-length holes may shrink and close up."""

from __future__ import annotations

import pytest
import torch

from diffusion_lm.errors import ConfigError
from diffusion_lm.pipeline import splice_fills
from diffusion_lm.sampling import flexible_slots, infill, parse_spans, spans_to_ids

PAD, EOS, MASK, BOS = 0, 1, 2, 3
V = 12
SPECIAL = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)


def ending_lover(ids: torch.Tensor, attn: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """A denoiser whose favourite tokens are pad, then EOS, then content token 5 (as a small model in a
    finished-looking context): without hole constraints every hole comes back empty."""
    logits = torch.full((int(query.sum()), V), -4.0)
    logits[:, PAD] = 6.0
    logits[:, EOS] = 5.0
    logits[:, 5] = 1.0
    logits[:, 6] = 0.5
    logits[:, MASK] = float("-inf")
    return logits


def test_a_fixed_hole_gets_content_never_end_or_pad():
    row = [BOS, 7, MASK, MASK, MASK, 8, EOS]
    out = infill(ending_lover, [row], sampler="greedy", seed=0, **SPECIAL).ids[0]
    assert set(out[2:5]) <= {5, 6}  # text tokens (the greedy preset's guard alternates them)
    assert out[:2] == row[:2] and out[5:] == row[5:]


def test_a_variable_hole_may_shrink_to_pad_but_never_takes_eos():
    row = [BOS, 7, MASK, MASK, MASK, 8, MASK, MASK, EOS]
    flexible = [False, False, True, True, True, False, False, False, False]
    out = infill(ending_lover, [row], sampler="greedy", seed=0, flexible=[flexible], **SPECIAL).ids[0]
    assert out[2:5] == [PAD, PAD, PAD]  # the variable hole is empty: its slots are pad
    assert set(out[6:8]) <= {5, 6}  # the fixed hole next to it still holds text
    assert EOS not in out[:-1]


def test_flexible_flags_must_match_the_rows():
    with pytest.raises(ConfigError, match=r"flexible\[0\]"):
        infill(ending_lover, [[BOS, MASK, EOS]], flexible=[[True]], **SPECIAL)


def test_variable_hole_syntax_and_its_slot_flags():
    spans = parse_spans("a [[MASK:<=12]] b [[MASK:2]] c [[ mask : <= 3 ]]")
    assert spans == [("text", "a "), ("flex", 12), ("text", " b "), ("mask", 2), ("text", " c "), ("flex", 3)]
    words = {"a": 10, "b": 11, "c": 9}
    tokenize = lambda s: [words[w] for w in s.split()]  # noqa: E731
    ids = spans_to_ids("a [[MASK:<=2]] b [[MASK:1]]", tokenize, MASK)
    assert ids == [10, MASK, MASK, 11, MASK]
    assert flexible_slots(parse_spans("a [[MASK:<=2]] b [[MASK:1]]"), tokenize) == [False, True, True, False,
                                                                                     False]


@pytest.mark.parametrize("text, message", [
    ("x [[MASK:<=0]] y", "invalid slot count '0'"),
    ("x [[MASK:<=]] y", "invalid slot count ''"),
    ("x [[MASK:>=3]] y", "invalid slot count '>=3'"),
    ("x [[MASK:<=3 y", "unclosed '[['"),
])
def test_bad_hole_syntax_is_one_line_naming_the_hole(text, message):
    with pytest.raises(ValueError) as err:
        parse_spans(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_empty_variable_hole_closes_up_the_text():
    pieces = parse_spans("Hello, [[MASK:<=4]] you? I am [[MASK:<=2]].")
    assert splice_fills(pieces, ["", "fine"]) == "Hello, you? I am fine."
    assert splice_fills(pieces, ["how are", ""]) == "Hello, how are you? I am ."


def test_when_eos_and_pad_are_one_id_a_variable_hole_can_still_shrink():
    row = [BOS, 7, MASK, MASK, 8, MASK, EOS]
    flexible = [False, False, True, True, False, False, False]
    special = dict(mask_id=MASK, eos_id=PAD, pad_id=PAD)
    out = infill(ending_lover, [row], sampler="greedy", seed=0, flexible=[flexible], **special).ids[0]
    assert out[2:4] == [PAD, PAD] and out[5] != PAD  # (id 1 is ordinary text here)
