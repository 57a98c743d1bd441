"""``diffusion-lm check``: a backbone's masked-token accuracy and NLL before fine-tuning it.

The measurement is :func:`diffusion_lm.health.mlm_health`; this module picks the model
(:func:`diffusion_lm.loading.load_denoiser`) and a sample of the recipe's data, and prints the table.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from typing import Iterator, Optional

import torch

from ..backbone import SparseHeadDenoiser
from ..chat import DEFAULT_LANGUAGES, ChatTemplate
from ..data import CanvasPolicy, DataSource, DialogDataModule
from ..errors import ConfigError
from ..health import DEFAULT_RATES, HealthReport, mlm_health, template_ignore_ids
from ..loading import load_denoiser, resolve_device

__all__ = ["check_command"]

log = logging.getLogger("diffusion_lm.health")


def _read_recipe(path: Optional[str]) -> dict:
    if path is None:
        return {}
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--recipe {path!r}: no such file")
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def _sample_batches(template: ChatTemplate, sources: list, *, batch_size: int, max_samples: int,
                    max_length: int, canvas_length: int, seed: int, num_batches: int) -> Iterator[dict]:
    """``num_batches`` training batches of at most ``max_samples`` records per source, with the model's
    own chat template and the whole answer scored (no filler, over-long answers cut)."""
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
    data.connect(template)  # score with the model's own chat template
    data.setup("fit")
    return itertools.islice(data.train_dataloader(), num_batches)


def _measure(net: SparseHeadDenoiser, template: ChatTemplate, batches: Iterator[dict], rates: list[float],
             seed: int, device: torch.device, bf16: bool) -> HealthReport:
    use_bf16 = bf16 and device.type == "cuda"
    autocast = torch.autocast("cuda",
                              dtype=torch.bfloat16) if use_bf16 else torch.autocast("cpu", enabled=False)
    with autocast:
        return mlm_health(net, batches, mask_id=template.mask_id, vocab_size=net.vocab_size,
                          ignore_ids=template_ignore_ids(template), rates=rates, seed=seed, device=device)


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
    fit_config = _read_recipe(recipe)
    model_cfg = fit_config.get("model") or {}
    data_cfg = fit_config.get("data") or {}
    if model is None:
        model = model_cfg.get("backbone") if isinstance(model_cfg.get("backbone"), str) else None
        if model is None:
            raise ConfigError("--model is required (a hub id, a model folder, a .ckpt or an export folder)")
    if sources is None:
        sources = data_cfg.get("sources") or [
            {"path": "chatterbot", "format": "chatterbot", "language": lang} for lang in DEFAULT_LANGUAGES
        ]
    dev = resolve_device(device)
    net, template = load_denoiser(model, dev, attn_implementation or model_cfg.get("attn_implementation"))
    max_length = max_length or data_cfg.get("max_length") or 512
    canvas_length = canvas_length or (data_cfg.get("canvas") or {}).get("length") or 128
    batches = _sample_batches(template, sources, batch_size=batch_size, max_samples=max_samples,
                              max_length=max_length, canvas_length=canvas_length, seed=seed,
                              num_batches=num_batches)
    report = _measure(net, template, batches, rates, seed, dev, bf16)
    print(f"model: {model}")
    print(report.table())
    if not report.healthy:
        log.warning("MLM health check: %s: %s", report.verdict, report.message)
    if fail and report.verdict == "no_mlm":
        raise SystemExit(1)
    return report
