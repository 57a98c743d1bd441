"""Log-likelihood by Monte Carlo over the ELBO, and the lm-evaluation-harness adapter."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from diffusion_lm import DataSource, DialogDataModule, MaskedDiffusionLM
from diffusion_lm.backbone import ScratchBackbone
from diffusion_lm.data import CanvasPolicy
from diffusion_lm.errors import ConfigError
from diffusion_lm.likelihood import continuation_elbo

from .conftest import REPO, TINY, write_jsonl

MASK, V = 0, 5


pytestmark = pytest.mark.usefixtures("one_thread")


class ContextToy:
    """Logits at a queried slot = a base row per position + a contribution of every visible token, so
    the model is not consistent (different orderings give different likelihoods) but enumerable."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.base = torch.randn(8, V, generator=gen) * 2
        self.pair = torch.randn(8, V, V, generator=gen)

    def __call__(self, ids, attn, query):
        out = []
        for row, pos in zip(*query.nonzero(as_tuple=True)):
            logits = self.base[pos].clone()
            for k, tok in enumerate(ids[row].tolist()):
                if tok != MASK and k != pos:
                    logits += self.pair[pos, tok] / (1 + abs(k - int(pos)))
            logits[MASK] = float("-inf")
            out.append(logits)
        return torch.stack(out)


def _logp(toy, ids: list[int], pos: int, target: int) -> float:
    """log p(target at pos | ids) with ``ids[pos]`` masked."""
    x = torch.tensor([ids])
    query = torch.zeros_like(x, dtype=torch.bool)
    query[0, pos] = True
    return float(torch.log_softmax(toy(x, torch.ones_like(x), query).double(), -1)[0, target])


def _exact_elbo(toy, prefix: list[int], cont: list[int]) -> float:
    """The ELBO by enumeration: the average over orderings of the any-order autoregressive log-lik."""
    p, total, orders = len(prefix), 0.0, list(itertools.permutations(range(len(cont))))
    for order in orders:
        ids = prefix + [MASK] * len(cont)
        for j in order:
            total += _logp(toy, ids, p + j, cont[j])
            ids[p + j] = cont[j]
    return total / len(orders)


def test_one_token_continuation_is_the_exact_log_probability():
    toy = ContextToy()
    est = continuation_elbo(toy, [1, 2], [3], mask_id=MASK, samples=8, seed=0)
    assert est.loglik == pytest.approx(_logp(toy, [1, 2, MASK], 2, 3), abs=1e-9)


def test_estimate_converges_to_the_enumerated_elbo():
    toy = ContextToy()
    prefix, cont = [1, 2], [3, 4, 2]
    exact = _exact_elbo(toy, prefix, cont)
    few = continuation_elbo(toy, prefix, cont, mask_id=MASK, samples=6, seed=1)
    many = continuation_elbo(toy, prefix, cont, mask_id=MASK, samples=3000, seed=1, batch_size=1000)
    assert abs(many.loglik - exact) < max(4 * many.stderr, 0.02), (many, exact)
    assert many.stderr < few.stderr
    again = continuation_elbo(toy, prefix, cont, mask_id=MASK, samples=6, seed=1)
    assert again.loglik == few.loglik  # a fixed seed gives the same estimate
    with pytest.raises(ConfigError, match="mc_samples"):
        continuation_elbo(toy, prefix, cont, mask_id=MASK, samples=0)


# ------------------------------------------------------------------------------ the lm_eval adapter
QA = {"What is 2+2?": "Four.", "Как дела?": "Хорошо.", "Hello there": "Hi!", "Что нового?": "Ничего."}


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained until it answers four one-word dialogs (about 120 steps)."""
    pytest.importorskip("lm_eval")  # only the adapter's tests use it
    root = tmp_path_factory.mktemp("qa")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in QA.items()] * 8
    data = DialogDataModule([DataSource(str(write_jsonl(root / "qa.jsonl", rows)), format="messages",
                                        language="en", val_size=0)],
                            batch_size=16, max_length=64, canvas=CanvasPolicy(length=8, filler_weight=0.2))
    pl.seed_everything(0)
    model = MaskedDiffusionLM(ScratchBackbone(**TINY), learning_rate=1e-2, warmup_steps=5, canvas_length=8,
                              health_check=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=120, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, enable_checkpointing=False,
                         default_root_dir=root)
    trainer.fit(model, data)
    trainer.save_checkpoint(root / "qa.ckpt")
    return root / "qa.ckpt"


def test_adapter_ranks_the_trained_answer_first_and_generates_until_a_stop(trained_checkpoint):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from diffusion_lm.eval_harness import DiffusionLMEval

    lm = DiffusionLMEval(str(trained_checkpoint), mc_samples=16, device="cpu")
    answers = list(QA.values())
    for question, right in QA.items():
        requests = [Instance("loglikelihood", {}, (question, a), i) for i, a in enumerate(answers)]
        scores = [s for s, _ in lm.loglikelihood(requests)]
        assert all(math.isfinite(s) and s < 0 for s in scores)
        assert answers[scores.index(max(scores))] == right, (question, scores)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Hello there",), 0)])
    assert len(rolling) == 1 and rolling[0] < 0
    text = lm.generate_until([Instance("generate_until", {}, ("What is 2+2?", {"until": ["."]}), 0)])[0]
    assert "." not in text
    with pytest.raises(ConfigError, match="mc_samples"):
        DiffusionLMEval(str(trained_checkpoint), mc_samples=0)


def test_registered_name_and_a_local_multiple_choice_task_through_the_command(trained_checkpoint, tmp_path,
                                                                               monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    from diffusion_lm.cli import main
    from diffusion_lm.eval_harness import DiffusionLMEval

    assert get_model("diffusion_lm") is DiffusionLMEval
    monkeypatch.chdir(REPO)  # the task's data path is relative to the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "results.json"
    main(["eval", "--model", str(trained_checkpoint), "--tasks", "diffusion_lm_toy_mc", "--mc_samples", "8",
          "--builtin_tasks", "false", "--output", str(out)])
    results = json.loads(out.read_text(encoding="utf-8"))["results"]["diffusion_lm_toy_mc"]
    assert 0.0 <= results["acc,none"] <= 1.0 and 0.0 <= results["acc_norm,none"] <= 1.0
    assert "diffusion_lm_toy_mc" in capsys.readouterr().out  # lm_eval's table
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(trained_checkpoint), "--tasks", "no_such_task",
              "--builtin_tasks", "false"])
    assert "--tasks" in capsys.readouterr().err
