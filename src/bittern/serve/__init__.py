"""``bittern serve``: an OpenAI-compatible HTTP server with continuous batching.

:func:`create_app` builds the FastAPI application over an engine or a
:class:`~bittern.engine.scheduler.Scheduler` (embed it in your own ASGI server); :func:`serve` loads a checkpoint and
runs it under uvicorn. Needs the ``serve`` extra (``pip install -e ".[serve]"``: FastAPI, uvicorn,
prometheus-client).
"""

from __future__ import annotations

from bittern.serve.app import create_app
from bittern.serve.server import load_engine, serve

__all__ = ["create_app", "load_engine", "serve"]
