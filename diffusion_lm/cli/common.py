"""What the ``generate | infill | chat`` commands share: the model with its sampler, output files and
the one-line summary on stderr."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..files import atomic_write
from ..loading import load_for_inference
from ..pipeline import build_sampler
from ..sampling.config import SamplerSpec

__all__ = ["load_with_sampler", "open_output", "summary_line"]


def load_with_sampler(model: str, device: Optional[str], preset: Optional[str], sampler: SamplerSpec,
                      **flags: Any):
    """The model and the command's sampler; the sampler options are checked before the (slow) load,
    and resolved again against an export folder's stored presets after it."""
    config = build_sampler(preset, sampler, **flags)
    lm = load_for_inference(model, device)
    if lm.diffusion_config:  # an export folder: its stored presets and default preset
        config = build_sampler(preset, sampler, model=lm, **flags)
    return lm, config


def open_output(path: str):
    """``--output``: written whole or not at all (a failed run leaves the previous file untouched)."""
    return atomic_write(Path(path).expanduser())


def summary_line(what: str, result) -> str:
    """The stderr line after a command: time, forwards, tokens per forward and row, the seed."""
    st = result.stats
    per_row = st.tokens / st.row_forwards if st.row_forwards else 0.0
    return (f"{what} in {st.seconds:.2f} s: {st.nfe} batched forward passes, {per_row:.2f} tokens per "
            f"forward per row, seed {result.seed}")
