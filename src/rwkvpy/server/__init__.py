"""An OpenAI-compatible HTTP server for rwkvpy models, with continuous batching.

``rwkvpy serve -m MODEL`` (or ``python -m rwkvpy.server -m MODEL``) serves ``/v1/models``,
``/v1/completions``, ``/v1/chat/completions`` (streaming with Server-Sent Events),
``/v1/states`` (named starting states) and ``/health`` on 127.0.0.1:8000. See docs/server.md.

- :mod:`rwkvpy.engine` (re-exported here): the scheduler thread that owns the model (continuous
  batching, prefix cache), shared with batch jobs;
- :mod:`.protocol`: OpenAI request bodies -> prompts and SamplingParams, with OpenAI errors;
- :mod:`.app`: the FastAPI routes, streaming, limits, API key;
- :mod:`.startup`: what a server process does before it serves (shared with Ray replicas);
- the ``serve`` command itself lives in :mod:`rwkvpy.cli.serve`.

FastAPI and uvicorn are needed only here: ``pip install 'rwkvpy[server]'``.
"""

from ..engine import Engine, EngineClosed, Sequence

__all__ = ["Engine", "EngineClosed", "Sequence"]
