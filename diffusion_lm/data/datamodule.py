"""DialogDataModule: sources -> conversations -> (prompt ids, answer ids) -> length-grouped batches."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from ..errors import ConfigError
from .collate import CanvasPolicy, DiffusionCollator, LengthGroupedBatchSampler
from .conversation import BadRecord, Conversation, Turn
from .sources import DataSource, load_raw, to_conversation
from .template import ChatTemplate

__all__ = ["DialogDataModule", "ValidationPrompt", "DEFAULT_VALIDATION_PROMPTS", "SkipSummary"]

log = logging.getLogger(__name__)


@dataclass
class ValidationPrompt:
    """A fixed prompt the sampling callback answers at every validation."""

    text: str
    language: str = "en"

    def conversation(self) -> Conversation:
        return Conversation([Turn("user", self.text)], source="validation_prompts", language=self.language)


DEFAULT_VALIDATION_PROMPTS = [
    ValidationPrompt("Hello, how are you?", "en"),
    ValidationPrompt("What is your favorite book?", "en"),
    ValidationPrompt("Tell me about computers.", "en"),
    ValidationPrompt("Привет! Как дела?", "ru"),
    ValidationPrompt("Что ты любишь есть?", "ru"),
    ValidationPrompt("Расскажи мне о деньгах.", "ru"),
]


class SkipSummary(Counter):
    """Counts of skipped records per ``(source, reason)``."""

    def describe(self) -> str:
        if not self:
            return "no records skipped"
        lines = [f"{sum(self.values())} record(s) skipped:"]
        lines += [f"  {src}: {reason} x{n}" for (src, reason), n in sorted(self.items())]
        return "\n".join(lines)


class DialogDataModule(pl.LightningDataModule):
    """Builds the bilingual training mix and its batches.

    Args:
        sources: the datasets of the mix (see :class:`DataSource`).
        tokenizer: a tokenizer folder or hub id; default: the model's own (the chat template is
            taken from the LightningModule so training and sampling share one code path).
        batch_size: examples per rank per optimizer step.
        max_length: longest prompt + answer + filler in tokens.
        canvas: the end-token and filler policy of the answer region.
        train_turns: ``last`` assistant turn only, or ``all`` assistant turns (each with its context).
        total_samples: cap on the training mix size (e.g. 750000); default: the whole mix.
        strict: raise on the first bad record (naming source and index) instead of counting it.
        seed: seed of the validation split, mixing and shuffling.
        num_workers: DataLoader workers.
        num_proc: processes for tokenisation (``datasets.map``).
        validation_prompts: fixed prompts for the sampling callback (default: English + Russian).
        group_batches: length grouping chunk, in global batches (1 disables most grouping).
    """

    def __init__(
        self,
        sources: list[DataSource],
        tokenizer: Optional[str] = None,
        batch_size: int = 16,
        val_batch_size: Optional[int] = None,
        max_length: int = 512,
        canvas: CanvasPolicy = CanvasPolicy(),
        train_turns: Literal["last", "all"] = "last",
        total_samples: Optional[int] = None,
        strict: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        num_proc: Optional[int] = None,
        validation_prompts: Optional[list[ValidationPrompt]] = None,
        group_batches: int = 64,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError("data.sources is empty: give at least one source (path, format, language)")
        self.sources = [s if isinstance(s, DataSource) else DataSource(**s) for s in sources]
        self.tokenizer_path = tokenizer
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.max_length = max_length
        self.canvas = canvas if isinstance(canvas, CanvasPolicy) else CanvasPolicy(**canvas)
        self.train_turns = train_turns
        self.total_samples = total_samples
        self.strict = strict
        self.seed = seed
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.validation_prompts = validation_prompts if validation_prompts is not None else list(DEFAULT_VALIDATION_PROMPTS)
        self.group_batches = group_batches
        self.template: Optional[ChatTemplate] = None
        self.skipped = SkipSummary()
        self.train_dataset = None
        self.val_dataset = None
        self.summary: dict = {}

    # ----------------------------------------------------------------- template
    def resolve_template(self) -> ChatTemplate:
        """The chat template: the LightningModule's when attached to a Trainer, else from ``tokenizer``."""
        if self.template is not None:
            return self.template
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        model_template = getattr(module, "template", None)
        if self.tokenizer_path is not None:
            from ..backbone import load_tokenizer

            self.template = ChatTemplate(load_tokenizer(self.tokenizer_path))
            if model_template is not None and len(self.template.tokenizer) != len(model_template.tokenizer):
                raise ConfigError(
                    f"data.tokenizer={self.tokenizer_path!r} has {len(self.template.tokenizer)} tokens but the model's "
                    f"tokenizer has {len(model_template.tokenizer)}; leave data.tokenizer unset to use the model's."
                )
        elif model_template is not None:
            self.template = model_template
        else:
            raise ConfigError("DialogDataModule needs a tokenizer: set data.tokenizer or attach it to a MaskedDiffusionLM")
        return self.template

    # ------------------------------------------------------------ preprocessing
    def _process(self, raw, source: DataSource, split: str):
        """Raw records -> tokenised examples (cached by datasets.map); bad records counted."""
        template = self.resolve_template()
        canvas, max_length, train_turns, strict = self.canvas, self.max_length, self.train_turns, self.strict

        def convert(batch: dict, indices: list[int]) -> dict:
            out = {k: [] for k in ("prompt_ids", "answer_ids", "language", "source", "reason", "truncated")}
            keys = list(batch)
            for j, idx in enumerate(indices):
                record = {k: batch[k][j] for k in keys}
                try:
                    conv = to_conversation(record, source, idx)
                    targets = [i for i, t in enumerate(conv.turns) if t.role == "assistant"]
                    if train_turns == "last":
                        targets = targets[-1:]
                    produced = 0
                    for ti in targets:
                        prompt, answer = template.example(conv.turns, ti)
                        truncated = False
                        if len(answer) > canvas.length:
                            if canvas.overflow == "drop":
                                if ti == targets[-1] and produced == 0:
                                    raise BadRecord("answer_too_long", f"{len(answer)} > canvas {canvas.length}")
                                continue
                            answer, truncated = answer[: canvas.length], True  # no end target
                        needed = len(prompt) + (canvas.length if canvas.mode == "fixed" else len(answer))
                        if needed > max_length:
                            if ti == targets[-1] and produced == 0:
                                raise BadRecord("too_long", f"prompt {len(prompt)} + canvas > max_length {max_length}")
                            continue
                        out["prompt_ids"].append(prompt)
                        out["answer_ids"].append(answer)
                        out["language"].append(source.language)
                        out["source"].append(source.label)
                        out["reason"].append("")
                        out["truncated"].append(truncated)
                        produced += 1
                except BadRecord as bad:
                    if strict:
                        raise ValueError(
                            f"bad record {idx} in source {source.label!r} ({split}): {bad}. "
                            "Fix the record, or set data.strict=false to skip and count such records."
                        ) from bad
                    out["prompt_ids"].append([])
                    out["answer_ids"].append([])
                    out["language"].append(source.language)
                    out["source"].append(source.label)
                    out["reason"].append(bad.reason)
                    out["truncated"].append(False)
            return out

        processed = raw.map(
            convert,
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            num_proc=self.num_proc,
            desc=f"tokenising {source.label} ({split})",
        )
        for reason, n in Counter(r for r in processed["reason"] if r).items():
            self.skipped[(f"{source.label}/{split}", reason)] += n
        kept = processed.filter(lambda r: r == "", input_columns="reason")
        return kept.remove_columns("reason")

    def setup(self, stage: Optional[str] = None) -> None:
        """Load, split, tokenise and mix every source (once)."""
        if self.train_dataset is not None:
            return
        import datasets

        train_parts, val_parts, weights = [], [], []
        for source in self.sources:
            if source.streaming:
                raise NotImplementedError(
                    f"data source {source.label!r}: streaming sources are not supported by this data module yet; "
                    "set streaming: false (with max_samples to cap the download)"
                )
            raw = load_raw(source)
            if len(raw) == 0:
                raise ValueError(f"data source {source.label!r} ({source.path}) has no records")
            n_val = int(source.val_size) if source.val_size >= 1 else int(round(source.val_size * len(raw)))
            n_val = min(n_val, len(raw) - 1)
            if n_val > 0:
                split = raw.train_test_split(test_size=n_val, seed=self.seed, shuffle=True)
                raw_train, raw_val = split["train"], split["test"]
            else:
                raw_train, raw_val = raw, None
            train = self._process(raw_train, source, "train")
            if len(train) == 0:
                raise ValueError(f"data source {source.label!r}: every record was skipped\n{self.skipped.describe()}")
            train_parts.append(train)
            weights.append(source.weight)
            if raw_val is not None:
                val = self._process(raw_val, source, "validation")
                if len(val):
                    val_parts.append(val)

        if len(train_parts) == 1:
            mix = train_parts[0]
        else:
            total = sum(weights)
            mix = datasets.interleave_datasets(
                train_parts,
                probabilities=[w / total for w in weights],
                seed=self.seed,
                stopping_strategy="all_exhausted",
            )
        if self.total_samples is not None:
            mix = mix.shuffle(seed=self.seed).select(range(min(self.total_samples, len(mix))))
        self.train_dataset = mix
        self.val_dataset = datasets.concatenate_datasets(val_parts) if val_parts else None
        self.summary = {
            "train_examples": len(mix),
            "validation_examples": len(self.val_dataset) if self.val_dataset is not None else 0,
            "per_language": dict(Counter(mix["language"])),
            "per_source": dict(Counter(mix["source"])),
            "skipped": {f"{s}:{r}": n for (s, r), n in self.skipped.items()},
        }
        log.info("data: %s", self.summary)
        if self.skipped:
            log.warning(self.skipped.describe())

    # ----------------------------------------------------------- dataloaders
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        rank, world = self._rank_world()
        lengths = [len(p) + len(a) for p, a in zip(dataset["prompt_ids"], dataset["answer_ids"])]
        sampler = LengthGroupedBatchSampler(
            lengths,
            batch_size,
            rank=rank,
            world_size=world,
            shuffle=shuffle,
            drop_last=shuffle,
            seed=self.seed,
            group_batches=self.group_batches if shuffle else 1,
        )
        collator = DiffusionCollator(self.resolve_template().pad_id, self.canvas, seed=self.seed + rank)
        return DataLoader(
            dataset.with_format(None),
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self):
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """Batches of the fixed validation prompts (for ``diffusion-lm predict``)."""
        convs = [p.conversation() for p in self.validation_prompts]
        return DataLoader(convs, batch_size=self.val_batch_size, collate_fn=list)
