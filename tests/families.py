"""Tiny offline stand-ins for every encoder family the framework converts.

Each factory trains a small tokenizer with the ``tokenizers`` library in the family's style, wraps
it in the family's transformers tokenizer class, builds a random tiny model from a config, and
``save_pretrained``s both into a folder, so tests load them through the same
``load_backbone(folder)`` path a hub id takes:

==========  =====================================  ==========================================
family      real checkpoints                       tokenizer stand-in
==========  =====================================  ==========================================
modernbert  RuModernBERT, ettin, ModernBERT        byte-level BPE, [CLS]/[SEP]/[MASK]/[PAD]
mmbert      mmBERT (ModernBERT + Gemma tokenizer)  GemmaTokenizer <bos>/<eos>/<pad>/<mask>
bert        BERT                                   BertTokenizer (WordPiece)
roberta     RoBERTa                                RobertaTokenizer (byte-level BPE)
xlmr        XLM-R                                  XLMRobertaTokenizer (Unigram)
t5          FRIDA (T5 encoder, no MLM head)        T5Tokenizer (Unigram, no mask token)
==========  =====================================  ==========================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HIDDEN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

CORPUS = [
    "User: Hello there", "Assistant: Hi! How can I help?", "System: Be brief.", "What is 2+2?", "Four.",
    "Как дела?", "Хорошо, спасибо.", "Что нового?", "Ничего особенного.", "Привет! Как дела?",
    "The quick brown fox jumps over the lazy dog.", "Tell me about computers.", "What is your favorite book?",
    "Расскажи мне о деньгах.", "Что ты любишь есть?", "Hello, how are you? I am fine, thank you.",
] * 4

FAMILY_NAMES = ("modernbert", "mmbert", "bert", "roberta", "xlmr", "t5")


def _train(tok: Tokenizer, trainer) -> dict:
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return json.loads(tok.to_str())["model"]


def _bpe(specials: list[str], vocab_size: int = 400, byte_level: bool = True) -> tuple[dict, list]:
    tok = Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        alphabet = []
    model = _train(tok,
                   trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                       initial_alphabet=alphabet,
                                            show_progress=False))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _unigram(specials: list[tuple[str, float]], unk: str, vocab_size: int = 300) -> list[tuple[str, float]]:
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    names = [s for s, _ in specials]
    model = _train(tok, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=names, unk_token=unk,
                                                show_progress=False))
    pieces = [(p, s) for p, s in model["vocab"] if p not in names]
    return list(specials) + pieces


def modernbert_tokenizer():
    """ModernBERT style: byte-level BPE with [CLS] ... [SEP] around each text (PreTrainedTokenizerFast)."""
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    vocab, merges = _bpe(specials)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]",
                                   model_max_length=512)


def gemma_tokenizer():
    """mmBERT style: the Gemma tokenizer class with <pad>/<eos>/<bos>/<unk>/<mask>."""
    from transformers import GemmaTokenizer

    vocab, merges = _bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], byte_level=False)
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)


def bert_tokenizer():
    from transformers import BertTokenizer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    model = _train(tok,
                   trainers.WordPieceTrainer(vocab_size=400,
                                             special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                                                  show_progress=False))
    return BertTokenizer(vocab=model["vocab"])


def roberta_tokenizer():
    from transformers import RobertaTokenizer

    vocab, merges = _bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    return RobertaTokenizer(vocab=vocab, merges=merges)


def xlmr_tokenizer():
    from transformers import XLMRobertaTokenizer

    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=_unigram(specials, "<unk>"))


def t5_tokenizer():
    """T5 style: Unigram with <pad>=0, </s>=1, <unk>=2 and no mask token (like FRIDA)."""
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    return T5Tokenizer(vocab=_unigram(specials, "<unk>"), extra_ids=0)


def _ids(tok) -> dict:
    bos = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
    eos = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
    return dict(pad_token_id=tok.pad_token_id, bos_token_id=bos, eos_token_id=eos)


def _modernbert_model(tok, vocab_size: Optional[int] = None, hidden: Optional[dict] = None,
                      max_positions: int = 128):
    from transformers import AutoConfig, ModernBertForMaskedLM

    ids = _ids(tok)
    config = AutoConfig.for_model("modernbert", vocab_size=vocab_size or len(tok),
                                  max_position_embeddings=max_positions, cls_token_id=ids["bos_token_id"],
                                  sep_token_id=ids["eos_token_id"], **ids, **(hidden or HIDDEN))
    return ModernBertForMaskedLM(config)


def _bert_model(tok, model_type: str):
    from transformers import AutoConfig, AutoModelForMaskedLM

    extra = {"max_position_embeddings": 130} if model_type != "bert" else {"max_position_embeddings": 128}
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), **_ids(tok), **extra, **HIDDEN)
    return AutoModelForMaskedLM.from_config(config)


def _t5_encoder(tok):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    return T5EncoderModel(config)


FACTORIES: dict[str, tuple[Callable, Callable]] = {
    "modernbert": (modernbert_tokenizer, _modernbert_model),
    "mmbert": (gemma_tokenizer, _modernbert_model),
    "bert": (bert_tokenizer, lambda tok: _bert_model(tok, "bert")),
    "roberta": (roberta_tokenizer, lambda tok: _bert_model(tok, "roberta")),
    "xlmr": (xlmr_tokenizer, lambda tok: _bert_model(tok, "xlm-roberta")),
    "t5": (t5_tokenizer, _t5_encoder),
}


def make_family(name: str, folder: Path, *, seed: int = 0, config_edit: Optional[Callable] = None,
                **model_kwargs) -> Path:
    """Save a tiny random ``name`` model and its tokenizer into ``folder`` (created) and return it.

    ``config_edit(config)`` may change the model config before saving (e.g. drop pad/eos ids);
    ``model_kwargs`` go to the model factory (``vocab_size``, ``hidden``, ``max_positions`` for the
    ModernBERT families).
    """
    make_tok, make_model = FACTORIES[name]
    torch.manual_seed(seed)
    tok = make_tok()
    model = make_model(tok, **model_kwargs)
    if config_edit is not None:
        config_edit(model.config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
