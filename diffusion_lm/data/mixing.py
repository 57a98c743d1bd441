"""Former home of the mix arithmetic: it is :mod:`diffusion_lm.data.mix`'s; this module keeps the old
imports working."""

from .mix import StoppingStrategy, apportion, mix_size, source_indices

__all__ = ["apportion", "mix_size", "source_indices", "StoppingStrategy"]
