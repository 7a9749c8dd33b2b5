"""``bittern serve``: load a checkpoint and run the OpenAI-compatible app under uvicorn."""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path

import torch

from bittern import devices
from bittern.engine.engine import Engine, Weights, load
from bittern.engine.scheduler import Scheduler

DEFAULT_MAX_BATCH_GPU = 64
DEFAULT_MAX_BATCH_CPU = 8
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


def default_max_batch(device: str | torch.device | None) -> int:
    """Rows of the batch when none is given: 64 on a GPU, 8 on the CPU (the KV cache is ``rows x max_seq_len``)."""
    return DEFAULT_MAX_BATCH_GPU if devices.resolve_device(device).type == "cuda" else DEFAULT_MAX_BATCH_CPU


def load_engine(
    model: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    weights: Weights = "ternary",
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    cuda_graph: bool = True,
    compile: bool = True,
) -> Engine:
    """The engine a server runs: :func:`bittern.engine.load` with ``max_batch`` rows (default
    :func:`default_max_batch`)."""
    return load(
        model,
        device=device,
        dtype=dtype,
        weights=weights,
        max_batch=max_batch if max_batch is not None else default_max_batch(device),
        max_seq_len=max_seq_len,
        cuda_graph=cuda_graph,
        compile=compile,
    )


def serve(
    model: str | Path | Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int | None = None,
    prefill_tokens: int | None = None,
    shutdown_timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT,
    log_level: str = "info",
    sock: socket.socket | None = None,
    **engine_options: object,
) -> None:
    """Serve ``model`` (a checkpoint directory, loaded with :func:`load_engine` and ``engine_options``, or an
    engine) on ``host:port`` (or on the listening socket ``sock``) until SIGINT or SIGTERM.

    On a signal the server stops accepting connections, lets running requests finish for up to
    ``shutdown_timeout`` seconds (None: as long as they take), cancels the rest and returns. ``max_queue`` and
    ``prefill_tokens``: the :class:`~bittern.engine.scheduler.Scheduler`'s (None: its defaults).
    """
    import uvicorn

    from bittern.serve.app import create_app

    engine = model if isinstance(model, Engine) else load_engine(model, **engine_options)  # type: ignore[arg-type]
    if served_model_name is None:
        served_model_name = Path(str(model)).name if not isinstance(model, Engine) else "bittern"
    limits = {"max_queue": max_queue, "prefill_tokens": prefill_tokens}
    scheduler = Scheduler(engine, **{name: value for name, value in limits.items() if value is not None})
    if engine.cuda_graph:
        print("bittern serve: capturing the decode and prefill CUDA graphs (once per start)", file=sys.stderr,
              flush=True)  # fmt: skip
        scheduler.warm_up()
    app = create_app(scheduler, served_model_name=served_model_name, api_key=api_key,
                     shutdown_timeout=shutdown_timeout)  # fmt: skip
    grace = None if shutdown_timeout is None else max(1, round(shutdown_timeout))
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace)
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler that was installed
    # before it: a recording one here, so that a clean shutdown returns (the command exits 0) instead of dying of
    # the signal or raising KeyboardInterrupt.
    caught: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number))
                    for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
    try:
        server.run(sockets=[sock] if sock is not None else None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
