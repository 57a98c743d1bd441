"""A synthetic bilingual dialog task with deterministic answers and held-out prompts.

Numbers are written out in English or Russian words, and words are read back into digits::

    User: Spell 47 in English.      Assistant: forty seven
    User: Напиши 47 словами.        Assistant: сорок семь
    User: Digits of forty seven?    Assistant: 47
    User: Цифрами: сорок семь       Assistant: 47

A share of the numbers (never below 20, whose words are not compositional) is held out: their four
prompts appear in no training dialog, and answering them needs the composition of tens, units (and
hundreds) words seen only in other numbers. Answer and prompt lengths correlate with the language,
the direction and the size of the number, the way lengths correlate with language, source and task
in real chat mixes: so the task shows whether a batching scheme biases what each step learns.

It is used by the learning test and ``tools/bench_batching.py``; ``write_synthetic_task`` writes the
files a ``diffusion-lm fit`` run reads (one JSONL per language, in the ``messages`` schema) and a
word-level tokenizer of the task's vocabulary (every word one token, every digit one token), so a
small model built from a config learns the task in minutes on a CPU.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..chat import DEFAULT_ROLE_HEADERS

__all__ = [
    "KINDS",
    "SyntheticTask",
    "number_words",
    "synthetic_dialogs",
    "synthetic_tokenizer",
    "write_synthetic_task",
]

_EN_SMALL = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
             "sixteen seventeen eighteen nineteen").split()
_EN_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_RU_SMALL = ("ноль один два три четыре пять шесть семь восемь девять десять одиннадцать двенадцать "
             "тринадцать четырнадцать пятнадцать шестнадцать семнадцать восемнадцать девятнадцать").split()
_RU_TENS = "_ _ двадцать тридцать сорок пятьдесят шестьдесят семьдесят восемьдесят девяносто".split()
_RU_HUNDREDS = "_ сто двести триста четыреста пятьсот шестьсот семьсот восемьсот девятьсот".split()

# kind -> (language, prompt template, answer is words?)
KINDS = {
    "en_words": ("en", "Spell {digits} in English.", True),
    "ru_words": ("ru", "Напиши {digits} словами.", True),
    "en_digits": ("en", "Digits of {words}?", False),
    "ru_digits": ("ru", "Цифрами: {words}", False),
}


def number_words(n: int, language: str) -> str:
    """``n`` (0..999) in English or Russian words (``347`` -> ``three hundred forty seven`` /
    ``триста сорок семь``)."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words takes 0..999, got {n}")
    small, tens = (_EN_SMALL, _EN_TENS) if language == "en" else (_RU_SMALL, _RU_TENS)
    hundreds, rest = divmod(n, 100)
    words = []
    if hundreds:
        words += [_EN_SMALL[hundreds], "hundred"] if language == "en" else [_RU_HUNDREDS[hundreds]]
    if rest >= 20:
        words.append(tens[rest // 10])
        if rest % 10:
            words.append(small[rest % 10])
    elif rest or not hundreds:
        words.append(small[rest])
    return " ".join(words)


def _dialog(n: int, kind: str) -> dict:
    language, prompt, to_words = KINDS[kind]
    words = number_words(n, language)
    user = prompt.format(digits=n, words=words)
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": words if to_words else str(n)}],
            "language": language, "kind": kind, "number": n}


@dataclass
class SyntheticTask:
    """Training dialogs and held-out test dialogs of the number task."""

    train: list[dict]
    test: list[dict]


# The digits task ends every prompt with the four content tokens, so answer token j sits at one
# fixed distance from prompt token j in all four kinds (one alignment to learn, not four); the
# prefixes still differ in length by language and direction.
DIGIT_KINDS = {
    "en_words": ("en", "Spell in English: {digits}", True),
    "ru_words": ("ru", "Напиши словами: {digits}", True),
    "en_digits": ("en", "Digits: {words}", False),
    "ru_digits": ("ru", "Запиши цифрами: {words}", False),
}


def _digits_dialog(digits: str, kind: str) -> dict:
    language, prompt, to_words = DIGIT_KINDS[kind]
    names = _EN_SMALL if language == "en" else _RU_SMALL
    words = " ".join(names[int(d)] for d in digits)
    user = prompt.format(digits=digits, words=words)
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": words if to_words else digits}],
            "language": language, "kind": kind, "number": int(digits)}


def synthetic_dialogs(max_number: int = 300, held_out: float = 0.1, seed: int = 0,
                      task: str = "numbers", max_digits: int = 4) -> SyntheticTask:
    """All four kinds of dialog for a set of numbers, some of them held out.

    ``task="numbers"``: the numbers ``0 .. max_number - 1`` written as number words (``47`` ->
    ``forty seven``); a ``held_out`` share of the numbers from 20 up goes to ``test``. Generalising
    needs the composition of tens and units words: a hard task that small models learn late.
    ``task="digits"``: ``max_number`` strings of ``max_digits`` digits spelled digit by digit (``0470``
    -> ``zero four seven zero``), a ``held_out`` share of them in ``test``: a per-position mapping at a
    fixed offset (every prompt ends with the content), which small models learn in a few hundred
    steps; lengths still differ by language and direction (the prompts' prefixes).
    ``train`` is shuffled.
    """
    rng = random.Random(seed)
    if task == "digits":
        strings: set[str] = set()
        while len(strings) < max_number:
            strings.add("".join(rng.choice("0123456789") for _ in range(max_digits)))
        candidates = sorted(strings)
        test_items = set(rng.sample(candidates, max(1, round(held_out * len(candidates)))))
        train = [_digits_dialog(s, k) for s in sorted(strings) if s not in test_items for k in DIGIT_KINDS]
        test = [_digits_dialog(s, k) for s in sorted(test_items) for k in DIGIT_KINDS]
    elif task == "numbers":
        if not 21 <= max_number <= 1000:
            raise ValueError(f"max_number must be in 21..1000, got {max_number}")
        candidates = list(range(20, max_number))
        test_numbers = set(rng.sample(candidates, max(1, round(held_out * len(candidates)))))
        train = [_dialog(n, k) for n in range(max_number) if n not in test_numbers for k in KINDS]
        test = [_dialog(n, k) for n in sorted(test_numbers) for k in KINDS]
    else:
        raise ValueError(f"task must be 'numbers' or 'digits', got {task!r}")
    rng.shuffle(train)
    return SyntheticTask(train, test)


def write_synthetic_task(folder: str | Path, **kwargs) -> dict[str, Path]:
    """Write ``train_en.jsonl``, ``train_ru.jsonl``, ``test.jsonl`` and the task's tokenizer folder
    (``tokenizer``, see :func:`synthetic_tokenizer`) into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = synthetic_dialogs(**kwargs)
    paths = {"train_en": folder / "train_en.jsonl", "train_ru": folder / "train_ru.jsonl",
             "test": folder / "test.jsonl", "tokenizer": synthetic_tokenizer(folder / "tokenizer")}
    rows = {"train_en": [d for d in task.train if d["language"] == "en"],
            "train_ru": [d for d in task.train if d["language"] == "ru"], "test": task.test}
    for name, path in paths.items():
        if name not in rows:
            continue
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[name]),
                        encoding="utf-8")
    return paths


def synthetic_tokenizer(folder: str | Path, max_number: int = 1000) -> Path:
    """Save a word-level tokenizer covering the task's prompts and answers into ``folder``.

    Words and punctuation are single tokens, digits are split one per token (so ``47`` is ``4 7``
    and numbers compose from digits); BERT-style specials ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words: set[str] = set()
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                   pre_tokenizers.Digits(individual_digits=True)])
    texts = list(DEFAULT_ROLE_HEADERS.values())
    for text in texts:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    records = [_dialog(n, kind) for n in range(min(max_number, 1000)) for kind in KINDS]
    records += [_digits_dialog(str(d) * 4, kind) for d in range(10) for kind in DIGIT_KINDS]
    for record in records:
        for message in record["messages"]:
            words.update(piece for piece, _ in pre.pre_tokenize_str(message["content"]))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder = Path(folder)
    fast.save_pretrained(folder)
    return folder
