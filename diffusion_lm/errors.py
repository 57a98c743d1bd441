"""User-facing errors: the CLI prints these as one line (set DIFFUSION_LM_DEBUG=1 for the traceback)."""

__all__ = ["ConfigError", "TrainingDiverged"]


class ConfigError(ValueError):
    """A configuration or input problem the user can fix; the message names the option and the fix."""


class TrainingDiverged(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message names the step,
    the last good checkpoint and what to change."""
