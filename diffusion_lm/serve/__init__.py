"""``diffusion-lm serve``: an OpenAI-compatible HTTP server with dynamic batching, diffusion-aware
streaming and a web chat page (FastAPI + uvicorn); see docs/serving.md.

* :mod:`.schemas`: request bodies; :mod:`.errors`: OpenAI-style error bodies;
* :mod:`.scheduler`: the bounded queue and the batching worker (model-agnostic);
* :mod:`.engine`: requests -> tasks -> sampler calls, and stream states;
* :mod:`.app`: the routes and the static page; the command line is :mod:`diffusion_lm.cli.serve`.
"""

from .app import create_app
from .scheduler import BatchScheduler

__all__ = ["BatchScheduler", "create_app"]
