"""``python -m diffusion_lm`` is the ``diffusion-lm`` console script."""

from .cli import main

main()
