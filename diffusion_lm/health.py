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
* ``diffusion-lm check --model ...`` -- :func:`check_command`, the same check from the shell.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .errors import ConfigError

__all__ = [
    "HealthReport",
    "MLMHealthCheck",
    "MLMHealthError",
    "MLMHealthWarning",
    "RateResult",
    "check_command",
    "mlm_health",
]

log = logging.getLogger(__name__)

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
            f"  baselines: token-frequency NLL {self.unigram_nll:.3f}, uniform NLL log V = {self.uniform_nll:.3f}"
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
            f"at mask rate {low.rate:g} the backbone's NLL ({low.nll:.2f}) is not clearly below the token-frequency "
            f"baseline ({unigram:.2f}): it has no usable masked-LM ability (a fresh or random LM head, "
            "or a model that lost MLM in contrastive training, like FRIDA). Diffusion fine-tuning from it "
            "will start from scratch; prefer a backbone pretrained with MLM"
        )
    if low.accuracy < min_accuracy:
        return "weak", (
            f"masked-token accuracy at rate {low.rate:g} is only {low.accuracy:.1%} (NLL {low.nll:.2f} vs "
            f"token-frequency {unigram:.2f}): MLM ability is weak on this data (other language or domain?); "
            "expect slow conversion and low-quality, looping generations"
        )
    return "healthy", (
        f"masked-token accuracy {low.accuracy:.1%} at rate {low.rate:g}, {gain:.2f} nats better than token frequencies"
    )


@torch.no_grad()
def mlm_health(
    denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
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


def _template_ignore_ids(template, tokenizer) -> list[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {template.pad_id, template.eos_id, template.mask_id}
    if template.bos_id is not None:
        ids.add(template.bos_id)
    return sorted(ids)


def _vocab_size(denoiser_module) -> int:
    model = getattr(getattr(denoiser_module, "net", denoiser_module), "model", None)
    if model is not None and model.get_output_embeddings() is not None:
        return int(model.get_output_embeddings().weight.shape[0])
    return int(model.config.vocab_size)


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
        if any(cls.__name__ in _SHARDED_STRATEGIES for cls in type(trainer.strategy).__mro__):  # subclasses too
            rank_zero_info(
                "MLM health check skipped under a sharded strategy; run `diffusion-lm check --model ...` first"
            )
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "train_dataloader"):
            rank_zero_info("MLM health check skipped: it reads its sample from the datamodule's train_dataloader()")
            return
        # A fresh loader: iterating it does not move the fit loop's own loader or collator RNG.
        loader = datamodule.train_dataloader()
        template = pl_module.template
        device = pl_module.device
        batches = (
            {k: b[k].to(device) for k in _BATCH_KEYS if k in b} for b in itertools.islice(loader, self.num_batches)
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.strategy.precision_plugin.forward_context():
                report = mlm_health(
                    pl_module.denoise,
                    batches,
                    mask_id=template.mask_id,
                    vocab_size=_vocab_size(pl_module),
                    ignore_ids=_template_ignore_ids(template, pl_module.tokenizer),
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


# ----------------------------------------------------------------------------- diffusion-lm check
def _load_for_check(model: str, attn_implementation: Optional[str], device: torch.device):
    """(denoiser module, template, tokenizer) for a checkpoint, an export folder or a backbone."""
    from .backbone import Backbone, load_backbone
    from .data.template import ChatTemplate

    exported = os.path.isdir(model) and os.path.exists(os.path.join(model, "diffusion_config.json"))
    if os.path.isfile(model) or exported:
        from .module import load_model

        lm = load_model(model, map_location=device)
        return lm, lm.template, lm.tokenizer
    backbone, tokenizer = load_backbone(model, attn_implementation=attn_implementation)
    template = ChatTemplate(tokenizer)
    net = Backbone(backbone, template.mask_id).to(device).eval()
    return net, template, tokenizer


def _read_recipe(path: Optional[str]) -> dict:
    if path is None:
        return {}
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--recipe {path!r}: no such file")
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def check_command(
    model: Optional[str] = None,
    recipe: Optional[str] = None,
    sources: Optional[list[dict]] = None,
    rates: list[float] = list(DEFAULT_RATES),
    num_batches: int = 4,
    batch_size: int = 8,
    max_samples: int = 256,
    max_length: Optional[int] = None,
    canvas_length: Optional[int] = None,
    seed: int = 0,
    device: str = "auto",
    bf16: bool = True,
    attn_implementation: Optional[str] = "sdpa",
    fail: bool = False,
) -> HealthReport:
    """Measure a backbone's masked-token accuracy and NLL before fine-tuning it.

    Args:
        model: hub id or folder of a pretrained encoder, a ``.ckpt`` checkpoint or an export folder;
            default: ``model.backbone`` of ``--recipe``.
        recipe: a fit recipe (YAML, e.g. ``configs/mmbert-base.yaml``) to take the data sources,
            lengths and backbone from.
        sources: data sources (``[{path: ..., format: messages, language: ru}]``); default: the
            recipe's, else the chatterbot corpus in English and Russian.
        rates: mask rates to measure.
        num_batches / batch_size: the sample (each rate masks the same batches).
        max_samples: records read per source (a sample, not the whole set).
        max_length / canvas_length: longest prompt + answer, longest answer (default: the recipe's).
        seed: seed of the sample and of the masks.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` ...
        bf16: autocast to bfloat16 on CUDA.
        attn_implementation: attention for a hub/folder backbone (``sdpa``, ``flash``, ``eager``).
        fail: exit with status 1 when the verdict is ``no_mlm`` (for scripts).
    """
    from .data.collate import CanvasPolicy
    from .data.datamodule import DialogDataModule
    from .data.sources import DataSource

    fit_config = _read_recipe(recipe)
    model_cfg = fit_config.get("model") or {}
    data_cfg = fit_config.get("data") or {}
    if model is None:
        model = model_cfg.get("backbone") if isinstance(model_cfg.get("backbone"), str) else None
        if model is None:
            raise ConfigError("--model is required (a hub id, a model folder, a .ckpt or an export folder)")
    if sources is None:
        sources = data_cfg.get("sources") or [
            {"path": "chatterbot", "format": "chatterbot", "language": "en"},
            {"path": "chatterbot", "format": "chatterbot", "language": "ru"},
        ]
    canvas_length = canvas_length or (data_cfg.get("canvas") or {}).get("length") or 128
    max_length = max_length or data_cfg.get("max_length") or 512
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    attn = attn_implementation or model_cfg.get("attn_implementation")
    net, template, tokenizer = _load_for_check(model, attn, dev)

    capped = []
    for s in sources:
        src = s if isinstance(s, DataSource) else DataSource(**s)
        cap = min(src.max_samples or max_samples, max_samples)
        capped.append(dataclasses.replace(src, max_samples=cap, val_size=0))
    data = DialogDataModule(
        capped,
        batch_size=batch_size,
        max_length=max_length,
        canvas=CanvasPolicy(mode="none", length=canvas_length, overflow="truncate"),
        seed=seed,
    )
    data.template = template  # score with the model's own chat template
    data.setup("fit")
    loader = data.train_dataloader()
    batches = itertools.islice(loader, num_batches)
    use_bf16 = bf16 and dev.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)
    denoise = net.denoise if hasattr(net, "denoise") else net
    with autocast:
        report = mlm_health(
            denoise,
            batches,
            mask_id=template.mask_id,
            vocab_size=_vocab_size(net),
            ignore_ids=_template_ignore_ids(template, tokenizer),
            rates=rates,
            seed=seed,
            device=dev,
        )
    print(f"model: {model}")
    print(report.table())
    if not report.healthy:
        log.warning("MLM health check: %s: %s", report.verdict, report.message)
    if fail and report.verdict == "no_mlm":
        raise SystemExit(1)
    return report
