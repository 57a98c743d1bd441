"""MLM health check: can the backbone predict masked tokens at all, before GPU hours are spent?

Conversion to a diffusion LM works because the encoder already denoises masked text; a model that
lost that ability (FRIDA, trained contrastively, generated random text after fine-tuning) or an
encoder with a freshly initialised head starts from nothing. The check masks a share of the answer
tokens of a few training batches at several rates (0.15, the MLM pretraining rate, up to 0.9, close
to the all-[MASK] start of generation) and reports masked-token accuracy and NLL, next to two
baselines computed on the same tokens: the unigram (token frequency) NLL and ``log V`` (uniform).
A model that is not clearly better than token frequencies at 15% masking has no usable MLM ability.

* :func:`mlm_health` -- plain torch, any denoiser.
* :class:`MLMHealthCheck` -- a Lightning callback that runs it at the start of ``fit`` and logs the
  figures; :class:`~diffusion_lm.MaskedDiffusionLM` adds one by default (``health_check=False``
  turns it off; put your own ``MLMHealthCheck`` in ``trainer.callbacks`` to configure it).
* ``diffusion-lm check --model ...`` -- the same check from the shell (:mod:`diffusion_lm.cli.check`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .denoiser import Denoiser
from .errors import ConfigError

__all__ = [
    "HealthReport",
    "MLMHealthCheck",
    "MLMHealthError",
    "MLMHealthWarning",
    "RateResult",
    "mlm_health",
    "template_ignore_ids",
]


DEFAULT_RATES = (0.15, 0.5, 0.9)
_BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "metric_mask")

Verdict = Literal["healthy", "weak", "no_mlm"]


class MLMHealthWarning(UserWarning):
    """The backbone's masked-token predictions look weak or absent."""


class MLMHealthError(RuntimeError):
    """Raised by :class:`MLMHealthCheck` with ``on_failure="raise"`` when the backbone has no MLM ability."""


@dataclass
class RateResult:
    """Figures at one mask rate: accuracy and mean NLL (nats) over ``tokens`` masked tokens."""

    rate: float
    accuracy: float
    nll: float
    tokens: int


@dataclass
class HealthReport:
    """Result of :func:`mlm_health`.

    Attributes:
        results: one :class:`RateResult` per mask rate, in increasing rate order.
        unigram_nll: NLL of the scored tokens under their own frequency distribution (the entropy
            of the sample): what a model that ignores the context can reach at best.
        uniform_nll: ``log V``, what a head with no information scores (a random head is near it).
        verdict: ``healthy``; ``weak`` (better than frequencies but low accuracy); ``no_mlm`` (not
            clearly better than token frequencies at the lowest rate).
        message: one human sentence explaining the verdict.
    """

    results: list[RateResult]
    unigram_nll: float
    uniform_nll: float
    verdict: Verdict
    message: str

    @property
    def healthy(self) -> bool:
        return self.verdict == "healthy"

    def metrics(self, prefix: str = "mlm_check/") -> dict[str, float]:
        """Flat figures for a logger: ``acc_mask15``, ``nll_mask15``, ..., baselines and ``healthy``."""
        out: dict[str, float] = {}
        for r in self.results:
            tag = f"mask{round(r.rate * 100)}"
            out[f"{prefix}acc_{tag}"] = r.accuracy
            out[f"{prefix}nll_{tag}"] = r.nll
        out[f"{prefix}unigram_nll"] = self.unigram_nll
        out[f"{prefix}uniform_nll"] = self.uniform_nll
        out[f"{prefix}healthy"] = float(self.healthy)
        return out

    def table(self) -> str:
        """A small text table of the figures and the verdict."""
        lines = [
            "MLM health check (masked answer tokens of a training sample)",
            "  mask rate   accuracy   NLL (nats)   tokens",
        ]
        for r in self.results:
            lines.append(f"  {r.rate:9.2f}   {r.accuracy:8.3f}   {r.nll:10.3f}   {r.tokens:6d}")
        lines.append(
            f"  baselines: token-frequency NLL {self.unigram_nll:.3f}, uniform NLL log V = "
            f"{self.uniform_nll:.3f}"
        )
        lines.append(f"  verdict: {self.verdict} -- {self.message}")
        return "\n".join(lines)


def _verdict(
    results: Sequence[RateResult], unigram: float, min_gain_nats: float, min_accuracy: float
) -> tuple[Verdict, str]:
    if not results or results[0].tokens == 0:
        return "no_mlm", "no answer tokens were scored: the sample is empty"
    low = results[0]
    gain = unigram - low.nll
    if gain < min_gain_nats:
        return "no_mlm", (
            f"at mask rate {low.rate:g} the backbone's NLL ({low.nll:.2f}) is not clearly below the "
            f"token-frequency baseline ({unigram:.2f}): it has no usable masked-LM ability (a fresh or "
            "random LM head, or a model that lost MLM in contrastive training, like FRIDA). Diffusion "
            "fine-tuning from it will start from scratch; prefer a backbone pretrained with MLM"
        )
    if low.accuracy < min_accuracy:
        return "weak", (
            f"masked-token accuracy at rate {low.rate:g} is only {low.accuracy:.1%} (NLL {low.nll:.2f} vs "
            f"token-frequency {unigram:.2f}): MLM ability is weak on this data (other language or domain?); "
            "expect slow conversion and low-quality, looping generations"
        )
    return "healthy", (
        f"masked-token accuracy {low.accuracy:.1%} at rate {low.rate:g}, {gain:.2f} nats better than token "
        "frequencies"
    )


@torch.no_grad()
def mlm_health(
    denoiser: Denoiser,
    batches: Iterable[dict],
    *,
    mask_id: int,
    vocab_size: int,
    ignore_ids: Iterable[int] = (),
    rates: Sequence[float] = DEFAULT_RATES,
    seed: int = 0,
    device: Optional[torch.device | str] = None,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    min_gain_nats: float = 0.5,
    min_accuracy: float = 0.25,
    max_scored_per_call: int = 1024,
) -> HealthReport:
    """Masked-token accuracy and NLL of ``denoiser`` at several mask rates.

    Args:
        denoiser: ``(input_ids, attention_mask, query) -> float32 logits at query`` ([MASK] at -inf).
        batches: collated batches (``input_ids``, ``attention_mask``, ``loss_mask``, optional
            ``metric_mask``); the answer tokens (``metric_mask``, else ``loss_mask``) are scored,
            the prompt stays visible, as in fine-tuning.
        mask_id / vocab_size: the [MASK] id and the number of logits.
        ignore_ids: token ids never scored (pad, end-of-answer, BOS: template tokens, not text).
        rates: mask rates, each an independent pass over the batches.
        seed: seed of the masks (the same seed gives the same masks).
        device: where to run (default: the batches' device).
        reduce: sums a tensor over processes (DDP); default: this process only.
        min_gain_nats / min_accuracy: verdict thresholds at the lowest rate (see :class:`HealthReport`).
        max_scored_per_call: batches are split by rows so one call scores about this many tokens
            (bounds the ``[N, V]`` logits: 1024 x 256k fp32 is 1 GiB for mmBERT).
    """
    rates = sorted(float(r) for r in rates)
    if not rates or any(not 0 < r <= 1 for r in rates):
        raise ConfigError(f"mask rates must be in (0, 1], got {list(rates)}")
    ignore = sorted({int(i) for i in ignore_ids if i is not None} | {int(mask_id)})
    sums = torch.zeros(len(rates), 3, dtype=torch.float64)  # nll sum, correct, count
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    for batch in batches:
        ids = batch["input_ids"].to(device) if device is not None else batch["input_ids"]
        dev = ids.device
        attn = batch["attention_mask"].to(dev)
        scored = batch.get("metric_mask", batch["loss_mask"]).to(dev).bool()
        region = scored & ~torch.isin(ids, torch.tensor(ignore, device=dev))
        counts += torch.bincount(ids[region].cpu(), minlength=vocab_size)[:vocab_size].to(torch.float64)
        for i, rate in enumerate(rates):
            u = torch.rand(ids.shape, generator=gen).to(dev)
            masked = region & (u < rate)
            noised = torch.where(masked, torch.full_like(ids, mask_id), ids)
            for rows in _row_chunks(masked.sum(dim=1).tolist(), max_scored_per_call):
                q = masked[rows]
                if not bool(q.any()):
                    continue
                logits = denoiser(noised[rows], attn[rows], q).float()
                target = ids[rows][q]
                nll = F.cross_entropy(logits, target, reduction="sum")
                correct = (logits.argmax(dim=-1) == target).sum()
                sums[i, 0] += float(nll)
                sums[i, 1] += float(correct)
                sums[i, 2] += float(target.numel())
    if reduce is not None:
        packed = reduce(torch.cat([sums.flatten(), counts]).to(dev)).cpu()
        sums, counts = packed[: sums.numel()].view_as(sums), packed[sums.numel() :]
    results = [
        RateResult(rate, float(c / n) if n else 0.0, float(s / n) if n else float("nan"), int(n))
        for rate, (s, c, n) in zip(rates, sums.tolist())
    ]
    total = counts.sum()
    p = counts[counts > 0] / total.clamp_min(1)
    unigram = float(-(p * p.log()).sum()) if total > 0 else float("nan")
    verdict, message = _verdict(results, unigram, min_gain_nats, min_accuracy)
    return HealthReport(results, unigram, math.log(vocab_size), verdict, message)


def _row_chunks(per_row: Sequence[int], budget: int) -> list[slice]:
    """Consecutive row slices holding at most ``budget`` scored tokens each (at least one row)."""
    chunks, start, total = [], 0, 0
    for row, n in enumerate(per_row):
        if row > start and total + n > budget:
            chunks.append(slice(start, row))
            start, total = row, 0
        total += n
    if start < len(per_row):
        chunks.append(slice(start, len(per_row)))
    return chunks


def template_ignore_ids(template) -> list[int]:
    """Token ids never scored: the tokenizer's special tokens and the template's pad/end/mask/BOS."""
    ids = set(getattr(template.tokenizer, "all_special_ids", []) or [])
    ids |= {template.pad_id, template.eos_id, template.mask_id}
    if template.bos_id is not None:
        ids.add(template.bos_id)
    return sorted(ids)


_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


class MLMHealthCheck(pl.Callback):
    """Run :func:`mlm_health` on a few training batches when ``fit`` starts, log it, warn if poor.

    The figures go to every logger as ``mlm_check/acc_mask15``, ``mlm_check/nll_mask15``, ... (step
    0), the table to the console, and a :class:`MLMHealthWarning` is raised (as a warning) when the
    verdict is not ``healthy``. Skipped when resuming from a checkpoint (the backbone is no longer
    the pretrained one) and under sharded strategies (FSDP, DeepSpeed: the forward must run through
    the sharded wrapper; run ``diffusion-lm check`` beforehand instead).

    Args:
        rates: mask rates to measure.
        num_batches: training batches per rate (per rank): keep it a few, it runs before step 1.
        seed: mask seed.
        on_failure: ``warn`` (default) or ``raise`` (:class:`MLMHealthError`) when the verdict is
            ``no_mlm``, to stop a run on a backbone that cannot denoise.
        min_gain_nats / min_accuracy: verdict thresholds (see :func:`mlm_health`).
    """

    def __init__(
        self,
        rates: Sequence[float] = DEFAULT_RATES,
        num_batches: int = 4,
        seed: int = 0,
        on_failure: Literal["warn", "raise"] = "warn",
        min_gain_nats: float = 0.5,
        min_accuracy: float = 0.25,
    ) -> None:
        super().__init__()
        if num_batches < 1:
            raise ConfigError(f"MLMHealthCheck.num_batches must be >= 1, got {num_batches}")
        self.rates = tuple(rates)
        self.num_batches = num_batches
        self.seed = seed
        self.on_failure = on_failure
        self.min_gain_nats = min_gain_nats
        self.min_accuracy = min_accuracy
        self.report: Optional[HealthReport] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path:
            rank_zero_info("MLM health check skipped: resuming from a checkpoint")
            return
        if any(cls.__name__ in _SHARDED_STRATEGIES for cls in type(trainer.strategy).__mro__):  # subclasses
            rank_zero_info(
                "MLM health check skipped under a sharded strategy; run `diffusion-lm check --model ...` "
                "first"
            )
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_dataloader"):
            rank_zero_info("MLM health check skipped: it reads its sample from the datamodule's "
                           "train_dataloader()")
            return
        # A fresh loader: iterating it does not move the fit loop's own loader or collator RNG.
        loader = datamodule.train_dataloader()
        template = pl_module.template
        device = pl_module.device
        batches = ({k: b[k].to(device) for k in _BATCH_KEYS if k in b}
                   for b in itertools.islice(loader, self.num_batches))
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.strategy.precision_plugin.forward_context():
                report = mlm_health(
                    pl_module.denoise,
                    batches,
                    mask_id=template.mask_id,
                    vocab_size=pl_module.net.vocab_size,
                    ignore_ids=template_ignore_ids(template),
                    rates=self.rates,
                    seed=self.seed,
                    reduce=lambda t: trainer.strategy.reduce(t.to(device), reduce_op="sum"),
                    min_gain_nats=self.min_gain_nats,
                    min_accuracy=self.min_accuracy,
                )
        finally:
            pl_module.train(was_training)
        del loader
        self.report = report
        for logger in trainer.loggers:
            logger.log_metrics(report.metrics(), step=trainer.global_step)
        rank_zero_info(report.table())
        if not report.healthy:
            rank_zero_warn(f"MLM health check: {report.verdict}: {report.message}", category=MLMHealthWarning)
            if report.verdict == "no_mlm" and self.on_failure == "raise":
                raise MLMHealthError(f"MLM health check failed: {report.message}")
