"""``bittern serve`` as a process: it answers on 127.0.0.1, and SIGTERM lets a running stream finish, then exits
0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import tokenizer, trained_model

import bittern
from bittern.cli import build_parser

START_SECONDS = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_options_parse() -> None:
    args = build_parser().parse_args(["serve", "m", "--port", "9000", "--max-batch", "4", "--max-seq-len", "512",
                                      "--device", "cpu", "--dtype", "float32", "--api-key", "k",
                                      "--served-model-name", "x"])  # fmt: skip
    assert (args.model, args.host, args.port, args.max_batch, args.max_seq_len) == ("m", "127.0.0.1", 9000, 4, 512)
    assert (args.device, args.dtype, args.api_key, args.served_model_name) == ("cpu", "float32", "k", "x")


def test_sigterm_finishes_the_running_stream_and_exits_cleanly(tmp_path: Path) -> None:
    tokenizer().save_pretrained(tmp_path / "tokenizer")
    checkpoint = bittern.save_model(trained_model("llama"), tmp_path / "packed", "packed",
                                    tokenizer_source=tmp_path / "tokenizer")  # fmt: skip
    port = _free_port()
    command = [sys.executable, "-m", "bittern.cli", "serve", str(checkpoint), "--port", str(port), "--max-batch", "2",
               "--max-seq-len", "256", "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_SECONDS
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "bittern serve did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        stream = client.completions.create(model="packed", prompt="The import", max_tokens=150, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        chunks = iter(stream)
        first = next(chunks)
        process.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].choices[0].finish_reason == "length"  # the running request was finished, not cut
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        assert text == bittern.load(checkpoint).generate("The import", 150, ignore_eos=True).text
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
