"""Train the small English+Russian tokenizer shipped with the embedded demo.

The demo model is built from a config (no hub download), so it needs a tokenizer that exists
offline. This script trains a BPE tokenizer on the ``chatterbot-corpus`` English and Russian
dialogs with ModernBERT-style special tokens and saves it as a Hugging Face tokenizer folder::

    python tools/train_demo_tokenizer.py --output diffusion_lm/assets/demo-tokenizer
"""

from __future__ import annotations

import argparse

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from diffusion_lm.data.sources import iter_chatterbot_texts

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train(vocab_size: int, languages: list[str]) -> PreTrainedTokenizerFast:
    """Train a Metaspace BPE tokenizer on the chatterbot dialogs of ``languages``."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, min_frequency=2)
    # Role headers of the chat template are ordinary text; include them so they are single tokens.
    texts = list(iter_chatterbot_texts(languages)) + ["User:", "Assistant:", "System:"] * 50
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="diffusion_lm/assets/demo-tokenizer")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--languages", nargs="+", default=["english", "russian"])
    args = parser.parse_args()
    train(args.vocab_size, args.languages).save_pretrained(args.output)
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
