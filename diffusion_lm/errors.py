"""User-facing errors: the CLI prints these as one line (set DIFFUSION_LM_DEBUG=1 for the traceback)."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration or input problem the user can fix; the message names the option and the fix."""
