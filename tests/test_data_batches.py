"""Batches: one template path for training and sampling, the loss mask, multi-turn, canvas policy,
and the length-grouped, rank-sharded batch sampler."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from diffusion_lm import MaskedDiffusionLM, ScratchBackbone
from diffusion_lm.backbone import DEMO_TOKENIZER
from diffusion_lm.data import (
    CanvasPolicy,
    Conversation,
    DataSource,
    DialogDataModule,
    DiffusionCollator,
    DialogBatchSampler,
    ExampleBuilder,
    LengthGroupedBatchSampler,
    Turn,
)

from .conftest import DIALOGS, TINY
from .families import make_family



def _turns(record: dict) -> list[Turn]:
    return [Turn(m["role"], m["content"]) for m in record["messages"]]


def _answer_start(row_loss_mask: torch.Tensor) -> int:
    return int(row_loss_mask.nonzero()[0])


def _example(batch: dict, i: int, key: str) -> torch.Tensor:
    """The ``key`` values of example ``i`` of a (possibly packed) batch, in order."""
    return batch[key][batch["example"] == i]


@pytest.mark.parametrize("family", ["demo", "mmbert", "t5"])
def test_sampler_prompt_is_the_training_prefix(tmp_path, messages_jsonl, family):
    """What MaskedDiffusionLM.prompt_ids gives the sampler is exactly what training put before the answer,
    for the ModernBERT-style demo tokenizer, the Gemma tokenizer (mmBERT) and a T5 tokenizer given a mask."""
    backbone = ScratchBackbone(**TINY) if family == "demo" else str(make_family(family, tmp_path / family))
    model = MaskedDiffusionLM(backbone, warmup_steps=0, health_check=False)
    data = DialogDataModule([DataSource(str(messages_jsonl), val_size=0)], batch_size=32, max_length=128,
                            canvas=CanvasPolicy(length=32), train_turns="all",
                            cache_dir=str(tmp_path / "cache"))
    batches = []

    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            batches.append(batch)

    pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
               limit_val_batches=0, callbacks=[Capture()], default_root_dir=tmp_path).fit(model, data)
    assert data.template is model.template  # the data module took the model's template
    batch = batches[0]
    multi_turn_rows = 0
    for i, (index, turn) in enumerate(zip(batch["index"], batch["turn"])):
        turns = _turns(DIALOGS[index])
        start = _answer_start(_example(batch, i, "loss_mask"))
        ids = _example(batch, i, "input_ids")
        prefix = ids[:start].tolist()
        assert prefix == model.prompt_ids(turns[:turn])
        assert prefix == model.prompt_ids(Conversation(turns[:turn]))
        assert prefix == model.template.prompt_ids(turns[:turn])
        answer = model.template.answer_ids(turns[turn].content)
        assert ids[start : start + len(answer)].tolist() == answer
        multi_turn_rows += turn > 1 and any(t.role == "assistant" for t in turns[:turn])
    assert multi_turn_rows, "the batch should contain a second answer of a multi-turn dialog"
    # A bare user message (what `diffusion-lm generate` passes) builds the one-turn conversation's prompt.
    assert model.prompt_ids("Hello there") == model.template.prompt_ids([Turn("user", "Hello there")])


def test_loss_mask_covers_answers_never_prompts(template):
    conv = _turns(DIALOGS[2])  # user, assistant, user, assistant (Russian)
    builder = ExampleBuilder(template, DataSource("x.jsonl"), CanvasPolicy(length=20), 96, "all", False,
                             "train")
    out = builder.run([DIALOGS[2]], [0])
    assert out["turn"] == [1, 3]  # every assistant turn, each with its own context
    assert out["prompt_ids"][1] == template.prompt_ids(conv[:3])
    assert out["prompt_ids"][1][: len(out["prompt_ids"][0]) + len(out["answer_ids"][0])] == (
        out["prompt_ids"][0] + out["answer_ids"][0])  # the first answer is context of the second
    last = ExampleBuilder(template, DataSource("x.jsonl"), CanvasPolicy(length=20), 96, "last", False,
                          "train")
    assert last.run([DIALOGS[2]], [0])["turn"] == [3]

    examples = [{"prompt_ids": p, "answer_ids": a} for p, a in zip(out["prompt_ids"], out["answer_ids"])]
    batch = DiffusionCollator(template.pad_id, CanvasPolicy(length=20), pad_to_multiple_of=8)(examples)
    for i, ex in enumerate(examples):
        p, a = len(ex["prompt_ids"]), len(ex["answer_ids"])
        assert not batch["loss_mask"][i, :p].any()  # the prompt is never noised
        assert batch["loss_mask"][i, p : p + 20].all() and not batch["loss_mask"][i, p + 20 :].any()
        assert batch["input_ids"][i, p + a - 1] == template.eos_id  # explicit end of answer
        assert (batch["input_ids"][i, p + a : p + 20] == template.pad_id).all()  # filler
    assert batch["input_ids"].shape[1] % 8 == 0


@pytest.mark.parametrize("mode", ["fixed", "sampled", "none"])
def test_canvas_policy_filler_and_weights(template, mode):
    canvas = CanvasPolicy(mode=mode, length=12, filler_weight=0.25)
    prompt, answer = template.prompt_ids([Turn("user", "Hi")]), template.answer_ids("Hello.")
    p, a = len(prompt), len(answer)
    collator = DiffusionCollator(template.pad_id, canvas, seed=3)
    fillers = set()
    for _ in range(40):
        batch = collator([{"prompt_ids": prompt, "answer_ids": answer}])
        filler = int(batch["loss_mask"][0].sum()) - a
        fillers.add(filler)
        assert batch["metric_mask"][0].nonzero().flatten().tolist() == list(range(p, p + a))  # never filler
        assert torch.all(batch["loss_weight"][0, p : p + a] == 1.0)
        assert torch.all(batch["loss_weight"][0, p + a : p + a + filler] == 0.25)
        assert batch["attention_mask"][0, : p + a + filler].all()  # filler is attended (it is data)
        assert not batch["attention_mask"][0, p + a + filler :].any()  # batch padding is not
    room = 12 - a
    expected = {"fixed": {room}, "none": {0}, "sampled": set(range(room + 1))}[mode]
    assert fillers == expected if mode != "sampled" else fillers <= expected and {0, room} <= fillers


def test_overflow_drop_or_truncate_without_an_end_token(template):
    long_answer = "one two three four five six seven eight nine ten eleven twelve"
    record = {"messages": [{"role": "user", "content": "Count."},
                           {"role": "assistant", "content": long_answer}]}
    full = template.answer_ids(long_answer)
    assert len(full) > 8
    drop = ExampleBuilder(template, DataSource("x.jsonl"), CanvasPolicy(length=8), 64, "last", False, "train")
    assert drop.run([record], [0])["reason"] == ["answer_too_long"]
    cut = ExampleBuilder(template, DataSource("x.jsonl"), CanvasPolicy(length=8, overflow="truncate"), 64,
                         "last", False, "train")
    out = cut.run([record], [0])
    assert out["reason"] == [""] and out["truncated"] == [True]
    assert out["answer_ids"][0] == full[:8] and template.eos_id not in out["answer_ids"][0]
    ex = {"prompt_ids": out["prompt_ids"][0], "answer_ids": out["answer_ids"][0], "truncated": True}
    short = {"prompt_ids": out["prompt_ids"][0], "answer_ids": template.answer_ids("Yes."),
             "truncated": False}
    batch = DiffusionCollator(template.pad_id, CanvasPolicy(length=8, overflow="truncate"))([ex, short])
    assert batch["truncated"].tolist() == [True, False]
    p = len(ex["prompt_ids"])
    assert int(batch["loss_mask"][0].sum()) == 8 and batch["metric_mask"][0].sum() == 8  # no filler, no end
    assert template.eos_id not in batch["input_ids"][0, p : p + 8].tolist()


def test_prompt_limit_is_max_length_minus_canvas(template):
    record = {"messages": [{"role": "user", "content": "a b c d e f g h i j"},
                           {"role": "assistant", "content": "k"}]}
    p = len(template.prompt_ids(_turns(record)[:1]))
    fits = ExampleBuilder(template, DataSource("x.jsonl"), CanvasPolicy(length=8), p + 8, "last", False,
                          "train")
    assert fits.run([record], [0])["reason"] == [""]
    too_long = ExampleBuilder(template, DataSource("x.jsonl"), CanvasPolicy(length=8), p + 7, "last", False,
                              "train")
    assert too_long.run([record], [0])["reason"] == ["prompt_too_long"]


def test_multi_turn_drops_only_the_answers_that_do_not_fit(tmp_path, template):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question?"}, {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "word " * 30}, {"role": "assistant", "content": "Second answer."},
    ]}
    builder = ExampleBuilder(template, DataSource("x.jsonl"), CanvasPolicy(length=8), 40, "all", False,
                             "train")
    out = builder.run([record], [0])
    kept = [t for t, r in zip(out["turn"], out["reason"]) if not r]
    dropped = [(r, partial) for r, partial in zip(out["reason"], out["partial"]) if r]
    assert kept == [2] and dropped == [("prompt_too_long", True)]  # counted as a dropped turn, not lost
    assert out["prompt_ids"][out["turn"].index(2)][:1] == [template.bos_id]
    system_ids = template.turn_ids(Turn("system", "Be brief."))
    assert out["prompt_ids"][out["turn"].index(2)][1 : 1 + len(system_ids)] == system_ids


def _shards(lengths, batch_size, world, epoch=0, **kw):
    samplers = [LengthGroupedBatchSampler(lengths, batch_size, rank=r, world_size=world, seed=5,
                                          group_batches=4, **kw)
                for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers], samplers


def test_batch_sampler_shards_ranks_like_one_global_batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (203,), generator=g).tolist()
    per_rank, samplers = _shards(lengths, 3, 4)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0]) == 203 // 12
    seen = [i for rank in per_rank for batch in rank for i in batch]
    assert len(seen) == len(set(seen))  # disjoint shards, no example twice in an epoch
    single, _ = _shards(lengths, 12, 1)
    for step, global_batch in enumerate(single[0]):  # the ranks together see the single-process batch
        assert sum((rank[step] for rank in per_rank), []) == global_batch
    # Length grouping: a global batch spans a far narrower length range than a random batch would.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in single[0]) / len(single[0])
    assert spread < 0.35 * (max(lengths) - min(lengths))


def test_batch_sampler_new_order_every_epoch_through_lightning():
    from lightning.fabric.utilities.data import _set_sampler_epoch  # what Lightning's fit loop calls

    lengths = list(range(40))
    sampler = LengthGroupedBatchSampler(lengths, 4, seed=1)
    loader = torch.utils.data.DataLoader(list(range(40)), batch_sampler=sampler)
    first = list(sampler)
    _set_sampler_epoch(loader, 1)
    assert sampler.epoch == 1 and list(sampler) != first
    _set_sampler_epoch(loader, 0)
    assert list(sampler) == first  # reproducible per epoch


def test_eval_sampler_is_sorted_complete_and_even_across_ranks():
    lengths = [7, 3, 9, 1, 5, 2, 8]
    per_rank, _ = _shards(lengths, 2, 2, shuffle=False, drop_last=False)
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    covered = {i for rank in per_rank for batch in rank for i in batch}
    assert covered == set(range(7))  # nothing left out (the short last global batch is topped up)
    counted = [int(k) for rank in per_rank for batch in rank for k in batch if k.counted]
    assert sorted(counted) == list(range(7))  # ... and the top-up copies do not count: each example once
    single, _ = _shards(lengths, 4, 1, shuffle=False, drop_last=False)
    flat = [i for batch in single[0] for i in batch]
    assert [lengths[i] for i in flat] == sorted(lengths)


def test_datamodule_loaders_shard_over_ranks(tmp_path, messages_jsonl):
    data = DialogDataModule([DataSource(str(messages_jsonl), val_size=4)], tokenizer=DEMO_TOKENIZER,
                            batch_size=2, max_length=96, canvas=CanvasPolicy(length=16),
                            cache_dir=str(tmp_path / "cache"))
    data.setup("fit")

    class FakeTrainer:  # the two attributes the data module reads
        def __init__(self, rank):
            self.global_rank, self.world_size = rank, 2

    loaders = []
    for rank in range(2):
        data.trainer = FakeTrainer(rank)
        loaders.append(data.train_dataloader())
    data.trainer = None
    batches = [[list(zip(b["index"], b["turn"])) for b in loader] for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(data.train_dataset) // 4
    rank0, rank1 = ({ex for batch in rank for ex in batch} for rank in batches)
    assert not rank0 & rank1 and len(rank0) == len(rank1) == 2 * len(batches[0])


def test_stratified_batches_hold_every_source_in_its_mix_share():
    """A 2:1 English/Russian mix of 300 examples in batches of 12: every batch has 8 English and 4
    Russian examples (a uniform draw would vary binomially), and each epoch is a new order."""
    strata = [0] * 200 + [1] * 100
    sampler = DialogBatchSampler([10] * 300, 12, strata=strata, seed=7)
    batches = list(sampler)
    assert len(batches) == 25
    assert all(sum(strata[i] for i in b) == 4 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(300))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    uniform = DialogBatchSampler([10] * 300, 12, seed=7)
    assert len({sum(strata[i] for i in b) for b in uniform}) > 1


def test_packed_batches_fill_rows_and_keep_every_example(template):
    prompt = template.prompt_ids([Turn("user", "Hi")])
    examples = [{"prompt_ids": prompt, "answer_ids": template.answer_ids(a), "sample_index": i}
                for i, a in enumerate(["Hello.", "Good morning to you.", "Yes.", "No, thanks."])]
    canvas = CanvasPolicy(mode="none", length=8)
    sizes = [len(e["prompt_ids"]) + len(e["answer_ids"]) for e in examples]
    padded = DiffusionCollator(template.pad_id, canvas, pad_to_multiple_of=1)(examples)
    packed = DiffusionCollator(template.pad_id, canvas, pad_to_multiple_of=1,
                               pack_length=sum(sizes) - 1)(examples)
    assert padded["input_ids"].shape[0] == 4 and packed["input_ids"].shape[0] == 2
    assert int(packed["attention_mask"].max()) == 3  # three segments in the first row
    for key in ("input_ids", "loss_mask", "loss_weight", "metric_mask", "position"):
        for i in range(4):  # every example's tokens and masks are the same, wherever it sits
            assert torch.equal(packed[key][packed["example"] == i], padded[key][padded["example"] == i]), key
    assert packed["sample_index"].tolist() == [0, 1, 2, 3]
