"""``safedecode serve``: an OpenAI-compatible server on the request-level engine.

Needs the ``serve`` extra (``pip install 'safedecode[serve]'``: FastAPI, uvicorn,
prometheus-client); Ray Serve scale-out needs ``safedecode[ray]``. Names are imported lazily, so
``safedecode`` itself works without them.
"""

from __future__ import annotations

import importlib

_NAMES = {"ServedModel": "app", "ServerConfig": "app", "create_app": "app",
          "EngineLoop": "loop", "ServeSpec": "server", "build_app": "server",
          "build_models": "server"}

__all__ = ["EngineLoop", "ServeSpec", "ServedModel", "ServerConfig", "build_app", "build_models",
           "create_app"]


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module 'safedecode.serve' has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{_NAMES[name]}", __name__)
    except ImportError as exc:
        raise ImportError(f"safedecode serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'safedecode[serve]'") from exc
    return getattr(module, name)
