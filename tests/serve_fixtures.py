"""A live ``safedecode serve`` in a subprocess on 127.0.0.1 (a free port), for the server tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

START_TIMEOUT = 180.0


class LiveServer:
    """``python -m safedecode serve ARGS --port 0``; ``url`` once it listens."""

    def __init__(self, args: list[str], workdir: Path, name: str = "server") -> None:
        self.ready = workdir / f"{name}.ready"
        self.log_path = workdir / f"{name}.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()),
                   PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "safedecode", "serve", "--host", "127.0.0.1", "--port", "0",
             "--ready-file", str(self.ready), "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        host, port = self.ready.read_text().split(":")
        assert host == "127.0.0.1"
        self.addr = f"127.0.0.1:{int(port)}"
        self.url = f"http://{self.addr}"

    def client(self, api_key: str = "sk-test", **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                      timeout=kw.pop("timeout", 120), **kw)

    def async_client(self, api_key: str = "sk-test"):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                           timeout=120)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        self.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        with contextlib.suppress(Exception):
            self.log.close()
        return rc
