"""``diffusion-lm serve``: an OpenAI-compatible HTTP server with dynamic batching, diffusion-aware
streaming and a web chat page (FastAPI + uvicorn); see docs/serving.md.

* :mod:`.schemas`: request bodies; :mod:`.errors`: OpenAI-style error bodies;
* :mod:`.scheduler`: the bounded queue and the batching worker (model-agnostic);
* :mod:`.engine`: requests -> tasks -> sampler calls, and stream states;
* :mod:`.app`: the routes and the static page; :mod:`.command`: the command line.
"""

from .app import create_app
from .command import serve_command
from .scheduler import BatchScheduler

__all__ = ["BatchScheduler", "create_app", "serve_command"]
