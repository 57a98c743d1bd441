"""Answer, reference and grouped metrics on hand-computed cases (a looping answer and a clean one)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lm.metrics import GroupedMeans, RatioMetric, chrf, exact_match, normalize_text
from diffusion_lm.objective import masked_token_accuracy
from diffusion_lm.sampling.metrics import (
    ANSWER_METRICS,
    answer_metrics,
    distinct_n,
    is_looping,
    longest_repeat,
    longest_run,
    repeated_ngram_rate,
)

CLEAN = "the cat sat on the mat".split()
LOOPING = "i am a bot i am a bot i am a bot".split()


# ------------------------------------------------------------------------------------ answer metrics
def test_distinct_n():
    assert distinct_n(CLEAN, 1) == pytest.approx(5 / 6)  # "the" twice
    assert distinct_n(CLEAN, 2) == 1.0  # 5 bigrams, all different
    assert distinct_n(LOOPING, 1) == pytest.approx(4 / 12)
    assert distinct_n(LOOPING, 2) == pytest.approx(4 / 11)  # i-am am-a a-bot bot-i
    assert distinct_n(["a", "b", "a", "b"], 2) == pytest.approx(2 / 3)
    assert distinct_n([], 1) == 1.0 and distinct_n(["x"], 2) == 1.0
    with pytest.raises(ValueError):
        distinct_n(CLEAN, 0)


def test_longest_repeat_is_the_longest_tandem_repeat():
    assert longest_repeat(list("xababay")) == 5  # a b a b a
    assert longest_repeat(list("aaa")) == 3
    assert longest_repeat(CLEAN) == 0
    assert longest_repeat(LOOPING) == 12  # the whole answer is "i am a bot" three times
    assert longest_repeat(["very", "very", "good"]) == 2
    assert longest_repeat(list("abcab"), max_period=2) == 0  # period 3 is beyond max_period


def test_looping_needs_three_copies_covering_four_units():
    assert is_looping(LOOPING)
    assert is_looping(["the"] * 4)
    assert not is_looping(CLEAN)
    assert not is_looping(["very", "very", "good"])  # two copies are ordinary text
    assert not is_looping(["x", "x", "x"])  # three copies, but only three units
    assert not is_looping("we i am we i am".split())  # two copies of a phrase
    assert is_looping("a b a b a b".split())


def test_answer_metrics_of_a_clean_and_a_looping_answer():
    clean = answer_metrics(CLEAN, eos_position=6)
    assert list(clean) == list(ANSWER_METRICS)
    assert clean == {"length": 6.0, "empty": 0.0, "eos_position": 6.0, "ended": 1.0,
                     "distinct1": pytest.approx(5 / 6), "distinct2": 1.0, "rep3": 0.0, "longest_run": 1.0,
                     "longest_repeat": 0.0, "looping": 0.0}
    loop = answer_metrics(LOOPING)  # ran to the end of the canvas: no EOS
    assert math.isnan(loop["eos_position"]) and loop["ended"] == 0.0
    # 10 trigrams, the first 4 are new and the 6 after them repeat
    assert loop["rep3"] == pytest.approx(6 / 10) == repeated_ngram_rate(LOOPING, 3)
    assert loop["looping"] == 1.0 and loop["longest_repeat"] == 12.0 and loop["longest_run"] == 1.0
    empty = answer_metrics([], eos_position=0)
    assert empty["empty"] == 1.0 and empty["length"] == 0.0 and empty["looping"] == 0.0
    assert longest_run(["a", "a", "a", "b"]) == 3


# ---------------------------------------------------------------------------------- reference metrics
def test_exact_match_normalises_whitespace_only():
    assert exact_match("Hello,  world\n", "Hello, world") == 1.0
    assert exact_match("hello, world", "Hello, world") == 0.0
    assert exact_match("a  b", "a b", normalize=False) == 0.0
    assert normalize_text("  e\u0301 \t x ") == "\u00e9 x"  # NFC and one space


def test_chrf_hand_computed():
    # "ab" vs "abc": 1-grams P = 2/2, R = 2/3; 2-grams P = 1/1, R = 1/2; no 3-gram in "ab".
    # CHRP = 1, CHRR = (2/3 + 1/2) / 2 = 7/12; chrF2 = 5 * 7/12 / (4 + 7/12) = 35/55
    assert chrf("ab", "abc") == pytest.approx(100 * 35 / 55)
    assert chrf("the cat", "thecat") == pytest.approx(100.0)  # whitespace is not counted
    assert chrf("", "abc") == 0.0 and chrf("", "") == 100.0
    assert chrf("xyz", "abc") == 0.0
    # symmetric beta = 1 case: P = 1, R = 7/12 -> F1 = 2 * 7/12 / (1 + 7/12) = 14/19
    assert chrf("ab", "abc", beta=1.0) == pytest.approx(100 * 14 / 19)
    # a looping answer scores below a clean one against the clean reference
    ref = " ".join(CLEAN)
    assert chrf(" ".join(LOOPING), ref) < chrf("the cat sat on a mat", ref) < 100.0


# ----------------------------------------------------------------------------------- grouped means
def test_ratio_metric_weighted_means_and_nan():
    m = RatioMetric(["a", "b"])
    m.update(torch.tensor([[1.0, float("nan")], [3.0, float("nan")]]), torch.tensor([[1.0, 1.0], [3.0, 1.0]]))
    a, b = m.compute().tolist()
    assert a == pytest.approx((1 + 9) / 4) and math.isnan(b)


def test_grouped_means_split_per_language_and_source():
    g = GroupedMeans(["length", "looping"])
    rows = [answer_metrics(CLEAN), answer_metrics(LOOPING), answer_metrics(["ок"])]
    g.update(rows, [["en", "src:chat"], ["en", "src:fim"], ["ru", "src:chat"]])
    out = g.compute("eval/")
    assert out["eval/length"] == pytest.approx((6 + 12 + 1) / 3)
    assert out["eval/length_en"] == pytest.approx(9.0) and out["eval/looping_en"] == pytest.approx(0.5)
    assert out["eval/length_ru"] == 1.0 and out["eval/looping_ru"] == 0.0
    assert out["eval/length_src:chat"] == pytest.approx(3.5) and out["eval/looping_src:fim"] == 1.0
    g.update([{"length": 2.0}], [["en"]], weights=[{"length": 3.0}])  # a missing figure has no weight
    assert g.compute()["length_en"] == pytest.approx((6 + 12 + 3 * 2) / 5)
    g.reset()
    assert g.compute() == {}


# ------------------------------------------------------------------------- masked-token accuracy
def _oracle(target: torch.Tensor, wrong: bool = False):
    def denoiser(ids, attn, query):
        logits = torch.zeros(int(query.sum()), 10)
        tokens = target[query]
        logits[torch.arange(tokens.numel()), (tokens + 1) % 10 if wrong else tokens] = 5.0
        return logits
    return denoiser


def test_masked_token_accuracy_at_a_fixed_rate():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    attn = torch.ones_like(ids)
    loss_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    uniforms = torch.tensor([[0.0, 0.1, 0.6, 0.2], [0.0, 0.0, 0.1, 0.9]])
    correct, total = masked_token_accuracy(_oracle(ids), ids, attn, loss_mask, 0.5, 9, uniforms)
    assert total.tolist() == [2.0, 1.0] and correct.tolist() == [2.0, 1.0]  # u < 0.5 inside loss_mask
    correct, total = masked_token_accuracy(_oracle(ids, wrong=True), ids, attn, loss_mask, 0.5, 9, uniforms)
    assert correct.tolist() == [0.0, 0.0] and total.tolist() == [2.0, 1.0]
    # grouped: both rows are one example (packed), and nothing masked at rate 0
    groups = torch.zeros_like(ids)
    correct, total = masked_token_accuracy(_oracle(ids), ids, attn, loss_mask, 0.5, 9, uniforms,
                                           groups=groups, num_groups=1)
    assert total.tolist() == [3.0] and correct.tolist() == [3.0]
    assert masked_token_accuracy(_oracle(ids), ids, attn, loss_mask, 0.0, 9, uniforms)[1].sum() == 0


def test_nelbo_split_per_language_and_source():
    from diffusion_lm.metrics import LanguageNelbo

    m = LanguageNelbo()
    m.update(torch.tensor([2.0, 6.0, 3.0]), torch.tensor([1.0, 2.0, 3.0]), ["en", "en", "ru"],
             ["tulu", "chat.v1", "tulu"])
    out = m.compute("val")
    assert out["val/nelbo"] == pytest.approx(11 / 6) and out["val/nelbo_en"] == pytest.approx(8 / 3)
    assert out["val/nelbo_ru"] == pytest.approx(1.0)
    assert out["val/nelbo_src:tulu"] == pytest.approx(5 / 4) and out["val/nelbo_src:chat.v1"] == 3.0


# ------------------------------------------------------------------------------------ task figures
def test_fim_figures_hand_computed():
    from diffusion_lm.evaluation import fim_figures

    prefix, suffix = "def add(a, b):\n    ", "\n    return c"
    right = fim_figures("c = a + b", " c = a + b ", prefix + "c = a + b" + suffix)
    assert right == {"exact": 1.0, "chrf": 100.0, "parses": 1.0, "empty": 0.0}
    broken = fim_figures("c = a + b", "c = a +", prefix + "c = a +" + suffix)
    assert broken["exact"] == 0.0 and broken["parses"] == 0.0 and 0.0 < broken["chrf"] < 100.0
    looping = fim_figures("c = a + b", "c c c c", prefix + "c c c c" + suffix)
    assert looping["parses"] == 0.0 and looping["chrf"] < broken["chrf"]
    assert fim_figures("c = a + b", "", prefix + suffix)["empty"] == 1.0


def test_edit_figures_hand_computed():
    from diffusion_lm.evaluation import edit_figures

    text = "The movie was really bad, honestly."
    span = (14, 24)  # "really bad"
    good = edit_figures(text, span, "quite dull", "quite dull", "The movie was quite dull, honestly.")
    assert good == {"rest_identical": 1.0, "exact": 1.0, "chrf": 100.0, "changed": 1.0, "empty": 0.0}
    same = edit_figures(text, span, "quite dull", "really bad", text)
    assert same["changed"] == 0.0 and same["exact"] == 0.0 and same["rest_identical"] == 1.0
    # the text after the span was touched: not byte-identical
    assert edit_figures(text, span, "x", "dull", "The movie was dull; honestly.")["rest_identical"] == 0.0
    # an empty fill closes up the space before it; the rest still counts as identical
    closed = edit_figures("I am very happy.", (5, 9), "", "", "I am happy.")
    assert closed["rest_identical"] == 1.0 and closed["empty"] == 1.0 and closed["exact"] == 1.0
