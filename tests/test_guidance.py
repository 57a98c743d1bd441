"""Classifier-free guidance (a wrapper around the denoiser) and training-time prompt dropout."""

from __future__ import annotations

import pytest
import torch

from diffusion_lm import MaskedDiffusionLM
from diffusion_lm.errors import ConfigError
from diffusion_lm.sampling import SamplerConfig, generate, infill
from diffusion_lm.sampling.guidance import GuidedDenoiser, guided

PAD, EOS, MASK, BOS = 0, 1, 2, 3
FREQUENT = 7  # what the toy says when it cannot see the prompt
V = 30
SPECIAL = dict(mask_id=MASK, eos_id=EOS, pad_id=PAD)


class PromptToy:
    """Logits that prefer the prompt's token (position 1) a little less than a frequent token; without
    the prompt only the frequent token is likely. Records the batch of every call."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor, attn: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids.clone())
        rows = query.nonzero(as_tuple=True)[0]
        prompt_token = ids[:, 1][rows]
        logits = torch.full((int(query.sum()), V), -5.0)
        logits[:, FREQUENT] = 2.5
        seen = prompt_token != MASK
        logits[seen.nonzero(as_tuple=True)[0], prompt_token[seen]] = 2.0
        logits[:, MASK] = float("-inf")
        return logits


def greedy(guidance: float = 0.0) -> SamplerConfig:
    return SamplerConfig(proposer="greedy", window="full", processors=[], guidance=guidance)


PROMPTS = [[BOS, 11], [BOS, 12, 13]]


def test_zero_guidance_is_exactly_the_unguided_sampler():
    plain, zero = PromptToy(), PromptToy()
    a = generate(plain, PROMPTS, canvas_length=4, sampler=SamplerConfig(proposer="greedy", window="full",
                                                                         processors=[]), seed=0, **SPECIAL)
    b = generate(zero, PROMPTS, canvas_length=4, sampler=greedy(0.0), seed=0, **SPECIAL)
    assert a.sequences == b.sequences
    assert [c.shape for c in plain.calls] == [c.shape for c in zero.calls]  # no doubled batch
    assert all(t == FREQUENT for row in a.ids for t in row)


def test_guidance_changes_the_answer_with_one_forward_per_step():
    toy = PromptToy()
    result = generate(toy, PROMPTS, canvas_length=4, sampler=greedy(1.0), seed=0, **SPECIAL)
    # guided: 2 + 1 * (2 - (-5)) = 9 for the prompt's token against 2.5 for the frequent one
    assert result.ids == [[11] * 4, [12] * 4]
    assert len(toy.calls) == result.stats.nfe == 4  # both branches in one call per step
    first = toy.calls[0]
    assert first.shape[0] == 2 * len(PROMPTS)
    conditional, unconditional = first[:2], first[2:]
    assert conditional[0, :2].tolist() == [BOS, 11]
    assert (unconditional[0, :2] == MASK).all() and (unconditional[1, :3] == MASK).all()
    assert torch.equal(conditional[:, 3:], unconditional[:, 3:])  # the canvas is the same in both


def test_guidance_in_infill_masks_the_text_around_the_holes():
    toy = PromptToy()
    row = [BOS, 11, MASK, MASK, 5]
    result = infill(toy, [row], sampler=greedy(2.0), seed=0, **SPECIAL)
    assert result.ids == [[BOS, 11, 11, 11, 5]]
    unconditional = toy.calls[0][1]
    assert unconditional.tolist() == [MASK] * 5


def test_guided_logits_keep_banned_columns_and_follow_the_formula():
    cond = torch.tensor([[1.0, float("-inf"), 3.0]])
    uncond = torch.tensor([[2.0, float("-inf"), 0.0]])

    def both(ids, attn, query):
        return torch.cat([cond, uncond])

    ids, attn = torch.tensor([[5, MASK]]), torch.ones(1, 2, dtype=torch.long)
    query = torch.tensor([[False, True]])
    out = GuidedDenoiser(both, 0.5, MASK, torch.tensor([[True, False]]))(ids, attn, query)
    assert out[0, 1] == float("-inf") and not torch.isnan(out).any()
    assert torch.allclose(out[0, [0, 2]], torch.tensor([0.5, 4.5]))
    assert guided(both, 0.0, MASK, torch.zeros(1, 2, dtype=torch.bool)) is both


def test_guidance_option_errors_name_the_option():
    with pytest.raises(ConfigError, match="--guidance"):
        SamplerConfig.resolve(guidance=-1.0)
    with pytest.raises(ConfigError, match="--guidance"):
        SamplerConfig(guidance=float("nan"))
    config = SamplerConfig.resolve("greedy", guidance=1.5)
    assert config.guidance == 1.5 and SamplerConfig.from_dict(config.to_dict()).guidance == 1.5


def test_guided_generation_through_a_tiny_model(tiny_backbone):
    model = MaskedDiffusionLM(backbone=tiny_backbone, canvas_length=6, health_check=False).eval()
    calls = []

    def counting(ids, attn, query):
        calls.append(ids.shape[0])
        return model.net(ids, attn, query)

    model.denoise = counting
    plain = model.generate(["Hello", "Привет"], sampler=SamplerConfig.preset("greedy"), seed=3)
    zero = model.generate(["Hello", "Привет"], sampler=SamplerConfig.preset("greedy", guidance=0.0), seed=3)
    assert plain.ids == zero.ids
    calls.clear()
    guided_result = model.generate(["Hello", "Привет"], sampler=SamplerConfig.preset("greedy", guidance=3.0),
                                   seed=3)
    assert len(calls) == guided_result.stats.nfe and calls[0] == 4


def test_prompt_dropout_masks_whole_prompts_of_a_share_of_examples(tiny_backbone):
    with pytest.raises(ConfigError, match="model.prompt_dropout"):
        MaskedDiffusionLM(backbone=tiny_backbone, prompt_dropout=1.0)
    model = MaskedDiffusionLM(backbone=tiny_backbone, prompt_dropout=0.5, health_check=False)
    n, length = 400, 6
    ids = torch.arange(10, 10 + length).repeat(n, 1)
    loss_mask = torch.tensor([0, 0, 0, 1, 1, 0]).repeat(n, 1)
    attn = torch.tensor([1, 1, 1, 1, 1, 0]).repeat(n, 1)
    keys = torch.arange(n)[:, None].expand(n, length)
    r = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}
    out = model._drop_prompts(r, keys, seed=0, step=5)
    dropped = out[:, 0] == model.mask_id
    assert (out[dropped, :3] == model.mask_id).all() and (out[~dropped, :3] == ids[~dropped, :3]).all()
    assert torch.equal(out[:, 3:], ids[:, 3:])  # answers and padding untouched
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(out, model._drop_prompts(r, keys, seed=0, step=5))  # keyed, not global RNG


def test_training_with_prompt_dropout_feeds_masked_prompts(tiny_backbone, messages_jsonl):
    import lightning.pytorch as pl

    from diffusion_lm import DataSource, DialogDataModule
    from diffusion_lm.data import CanvasPolicy

    def first_tokens(dropout: float) -> torch.Tensor:
        pl.seed_everything(0)
        model = MaskedDiffusionLM(backbone=tiny_backbone, prompt_dropout=dropout, warmup_steps=0,
                                  health_check=False)
        seen = []
        forward = model.net.forward

        def recording(ids, attn, query, packed=None):
            seen.append(ids[:, :2].clone())  # BOS and the user header: always prompt
            return forward(ids, attn, query, packed=packed)

        model.net.forward = recording
        data = DialogDataModule([DataSource(str(messages_jsonl), format="messages", language="en",
                                            val_size=0)], batch_size=8, max_length=96,
                                canvas=CanvasPolicy(length=16))
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(model, data)
        return torch.cat(seen), model.mask_id

    dropped, mask_id = first_tokens(0.5)
    kept, _ = first_tokens(0.0)
    assert (dropped == mask_id).any() and not (kept == mask_id).any()
