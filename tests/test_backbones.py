"""Every encoder family loads through the real hub path (``load_backbone(folder)``), offline.

Tiny random models of each family are saved with ``save_pretrained`` (see ``tests/families.py``)
and loaded exactly as a hub id would be: special tokens are completed, T5 encoders get a fresh tied
head, attention implementations are selectable, and a 256k vocabulary trains without ``[B, L, V]``
logits.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch

from diffusion_lm import ConfigError, DataSource, DialogDataModule, MaskedDiffusionLM
from diffusion_lm.backbone import (
    SparseHeadDenoiser,
    T5EncoderForMaskedLM,
    ensure_special_tokens,
    load_backbone,
)
from diffusion_lm.data import CanvasPolicy, ChatTemplate, Turn

from .families import FAMILY_NAMES, make_family, roberta_tokenizer, t5_tokenizer

CLASSES = {
    "modernbert": "ModernBertForMaskedLM",
    "mmbert": "ModernBertForMaskedLM",
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "xlmr": "XLMRobertaForMaskedLM",
    "t5": "T5EncoderForMaskedLM",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_family(name, root / name) for name in FAMILY_NAMES}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_loads_and_head_split_matches_full_logits(folders, family):
    model, tokenizer = load_backbone(str(folders[family]))
    assert type(model).__name__ == CLASSES[family]
    template = ChatTemplate(tokenizer)  # raises if mask / pad / end tokens are missing
    assert len({template.mask_id, template.pad_id, template.eos_id}) == 3
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings
    ids = template.prompt_ids([Turn("user", "Привет! How are you?")]) + template.answer_ids("Хорошо, thanks.")
    x = torch.tensor([ids, ids[:-3] + [template.pad_id] * 3])
    attention = torch.ones_like(x)
    attention[1, -3:] = 0
    query = torch.zeros_like(x, dtype=torch.bool)
    query[:, -8:-3] = True
    net = SparseHeadDenoiser(model, template.mask_id).eval()
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=attention).logits[query].float()
        full[:, template.mask_id] = float("-inf")
        split = net(x, attention, query)
    assert split.shape == (int(query.sum()), model.get_output_embeddings().weight.shape[0])
    torch.testing.assert_close(split, full, rtol=1e-5, atol=1e-5)


def test_backbone_is_a_deprecated_name_of_the_sparse_head_denoiser(folders):
    from diffusion_lm.backbone import Backbone

    model, tokenizer = load_backbone(str(folders["bert"]))
    with pytest.warns(DeprecationWarning, match="SparseHeadDenoiser"):
        net = Backbone(model, tokenizer.mask_token_id)
    assert isinstance(net,
                      SparseHeadDenoiser) and net.vocab_size == model.get_output_embeddings().weight.shape[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_packed_row_computes_what_separate_rows_compute(folders, tmp_path, family, attn):
    """Several examples packed into one row (segments in the attention mask) give the logits each
    gives in a row of its own: attention stays inside a segment and positions restart."""
    folder = folders[family]
    if family == "modernbert":  # a short sliding window, so the local layers' segment mask matters
        folder = make_family("modernbert", tmp_path / "local",
                             config_edit=lambda c: setattr(c, "local_attention", 4))
    model, tokenizer = load_backbone(str(folder), attn_implementation=attn)
    net = SparseHeadDenoiser(model.eval(), tokenizer.mask_token_id)
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(5, len(tokenizer) - 1, (n,), generator=g) for n in (9, 14, 6)]
    width = max(len(e) for e in examples)
    rows = torch.full((3, width), tokenizer.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, e in enumerate(examples):
        rows[i, : len(e)], mask[i, : len(e)] = e, 1
    packed = torch.cat(examples + [torch.full((3,), tokenizer.pad_token_id)])[None]
    pieces = [torch.full((len(e),), i + 1) for i, e in enumerate(examples)]
    segments = torch.cat(pieces + [torch.zeros(3)]).long()[None]
    with torch.no_grad():
        separate = net(rows, mask, mask.bool())
        together = net(packed, segments, segments > 0)
    torch.testing.assert_close(together, separate, rtol=1e-4, atol=1e-4)


def test_t5_encoder_gets_a_mask_token_and_a_fresh_head_tied_to_its_embeddings(folders, caplog):
    from transformers import T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(folders["t5"])
    with caplog.at_level(logging.WARNING, logger="diffusion_lm.backbone"):
        loaded = load_backbone(str(folders["t5"]))
    model, tokenizer = loaded
    assert model.training  # ready to fine-tune: from_pretrained's eval mode would silently disable dropout
    model.eval()
    assert isinstance(model, T5EncoderForMaskedLM)
    assert loaded.fresh_head is True
    assert "no masked-LM head" in caplog.text
    assert tokenizer.mask_token == "<mask>" and tokenizer.mask_token_id == len(tokenizer) - 1
    assert model.shared.weight.shape[0] == len(tokenizer) == encoder.shared.weight.shape[0] + 1
    assert model.lm_head.decoder.weight is model.shared.weight  # tied: no second V x H matrix
    assert model.encoder.embed_tokens.weight is model.shared.weight
    # The pretrained body is intact: same hidden states on the old vocabulary.
    x = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(input_ids=x).last_hidden_state,
                                   encoder(input_ids=x).last_hidden_state)


def test_models_with_an_mlm_head_are_not_flagged_fresh(folders):
    assert load_backbone(str(folders["bert"])).fresh_head is False


def test_config_without_pad_and_eos_ids_gets_the_tokenizers(tmp_path):
    def drop_ids(config):
        config.pad_token_id = config.eos_token_id = config.bos_token_id = None

    folder = make_family("bert", tmp_path / "bert", config_edit=drop_ids)
    model, tokenizer = load_backbone(str(folder))
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.sep_token_id  # the end-of-answer token of a BERT vocabulary
    assert model.config.bos_token_id == tokenizer.cls_token_id


def test_tokenizer_without_mask_and_pad_gets_them_and_the_embeddings_grow():
    from transformers import AutoConfig, AutoModelForMaskedLM

    tokenizer = roberta_tokenizer()
    tokenizer.mask_token = None
    tokenizer.pad_token = None
    before = len(tokenizer)
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(
        "roberta", vocab_size=before, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                                  intermediate_size=32))
    added = ensure_special_tokens(tokenizer, model)
    assert set(added) == {"mask_token", "pad_token"}
    # "<mask>" / "<pad>" were already in the vocabulary: re-registered, not duplicated.
    assert len(tokenizer) == before
    assert tokenizer.convert_ids_to_tokens(tokenizer.mask_token_id) == "<mask>"
    template = ChatTemplate(tokenizer)
    assert template.eos_id == tokenizer.eos_token_id != template.pad_id


def test_pad_aliased_to_eos_gets_a_distinct_pad():
    tokenizer = t5_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style aliasing
    ensure_special_tokens(tokenizer)
    template = ChatTemplate(tokenizer)
    assert template.pad_id != template.eos_id == tokenizer.convert_tokens_to_ids("</s>")


def test_new_tokens_grow_the_embeddings(folders):
    tokenizer = t5_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra_a>", "<extra_b>"]})
    model, _ = load_backbone(str(folders["t5"]))
    ensure_special_tokens(tokenizer, model)
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert model.lm_head.decoder.weight is model.shared.weight
    assert model.lm_head.decoder.bias.shape[0] == len(tokenizer)


@pytest.mark.parametrize("family", ["modernbert", "t5"])
def test_attention_implementation_is_selectable_with_a_safe_fallback(folders, family, caplog):
    x = torch.tensor([[2, 10, 11, 12, 13, 3]])
    logits = {}
    for name in ("eager", "sdpa"):
        torch.manual_seed(0)  # the T5 head is freshly initialised at every load
        model, _ = load_backbone(str(folders[family]), attn_implementation=name)
        model.eval()
        assert model.config._attn_implementation == name
        with torch.no_grad():
            logits[name] = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)
    # flash-attn is not installed on this machine (and T5 has no flash kernel): fall back, loudly.
    with caplog.at_level(logging.WARNING, logger="diffusion_lm.backbone"):
        model, _ = load_backbone(str(folders[family]), attn_implementation="flash")
    assert model.config._attn_implementation == "sdpa"
    assert "falling back to 'sdpa'" in caplog.text


def test_unknown_attention_implementation_is_one_clear_error(folders):
    with pytest.raises(ConfigError, match="attn_implementation"):
        load_backbone(str(folders["bert"]), attn_implementation="no_such_kernel")


def test_architecture_without_masked_lm_class_is_one_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    roberta_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no masked-LM class"):
        load_backbone(str(tmp_path))


def test_gemma_size_vocabulary_trains_without_full_vocabulary_logits(tmp_path, messages_jsonl):
    """mmBERT-like: 256k vocabulary; the LM head only ever sees the masked positions."""
    vocab = 256_000
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32)
    folder = make_family("mmbert", tmp_path / "mmbert", vocab_size=vocab, hidden=tiny)
    model = MaskedDiffusionLM(str(folder), warmup_steps=0, health_check=False)
    shapes, positions = [], []
    head = model.net.model.get_output_embeddings()
    head.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            positions.append(int(batch["attention_mask"].numel()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            positions.append(int(trainer.callback_metrics["train/masked_tokens"]))

    data = DialogDataModule([DataSource(str(messages_jsonl), format="messages", language="en", val_size=0)],
                            batch_size=4, max_length=96, canvas=CanvasPolicy(length=16))
    before = model.net.model.get_input_embeddings().weight.detach().clone()
    pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
               callbacks=[Record()], default_root_dir=tmp_path).fit(model, data)
    batch_positions, masked = positions
    assert shapes == [(masked, vocab)], shapes  # one head call, on the masked positions only
    assert 0 < masked < batch_positions
    # the step trained the (tied) head
    assert not torch.equal(model.net.model.get_input_embeddings().weight, before)
