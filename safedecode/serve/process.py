"""``safedecode serve`` in a subprocess on 127.0.0.1 (a free port): for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT = 180.0


class ServerProcess:
    """``python -m safedecode serve ARGS --port 0``; ``url`` once it listens; ``stop()`` sends
    SIGTERM (drain) and returns the exit status."""

    def __init__(self, args: list[str], workdir: Path, name: str = "server", *,
                 threads: int | None = None, start_timeout: float = START_TIMEOUT) -> None:
        self.ready = Path(workdir) / f"{name}.ready"
        self.log_path = Path(workdir) / f"{name}.log"
        self.ready.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "safedecode", "serve", "--host", "127.0.0.1", "--port", "0",
             "--ready-file", str(self.ready), "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        host, port = self.ready.read_text().split(":")
        if host != "127.0.0.1":
            self.stop()
            raise RuntimeError(f"server listens on {host}, not 127.0.0.1")
        self.addr = f"127.0.0.1:{int(port)}"
        self.url = f"http://{self.addr}"

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

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
