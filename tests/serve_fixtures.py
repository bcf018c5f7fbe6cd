"""A live ``safedecode serve`` for the server tests, with ``openai`` clients."""

from __future__ import annotations

import torch

from safedecode.serve.process import ServerProcess


class LiveServer(ServerProcess):
    """The server with this process's torch thread count (same float results as offline)."""

    def __init__(self, args: list[str], workdir, name: str = "server") -> None:
        super().__init__(args, workdir, name, threads=torch.get_num_threads())

    def client(self, api_key: str = "sk-test", **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                      timeout=kw.pop("timeout", 120), **kw)

    def async_client(self, api_key: str = "sk-test"):
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0,
                           timeout=120)
