"""The ``rwkvpy`` command line: one module per group of verbs, all on the public API.

- :mod:`.options`: the options every verb shares (the model argument, how it runs);
- :mod:`.models`: info, bench, cache, convert, quantize, merge-lora;
- :mod:`.text`: generate, chat, tokenize;
- :mod:`.scoring`: perplexity, compare;
- :mod:`.evaluate`: eval (lm-evaluation-harness tasks);
- :mod:`.serve` and :mod:`.serve_ray`: serve (one process or Ray Serve);
- :mod:`.batch`: batch generate / perplexity;
- :mod:`.main`: the parser of every verb and :func:`main`, which runs one.
"""

from .main import main

__all__ = ["main"]
