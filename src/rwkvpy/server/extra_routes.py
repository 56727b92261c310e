"""Routes beside OpenAI's: ``POST /tokenize``, ``POST /detokenize`` (the shapes of llama.cpp's
and vLLM's servers), ``GET /tokenizer_info`` (vLLM's) and ``GET /metrics`` (Prometheus,
server/metrics.py).

- ``/tokenize``: ``{"content": TEXT}`` (llama.cpp) or ``{"prompt": TEXT}`` (vLLM) gives
  ``{"tokens": [ids], "count": n}``; ``"with_pieces": true`` makes each token
  ``{"id", "piece"}`` (the piece as server/responses.py writes token strings); ``{"messages":
  [...]}`` tokenizes a conversation in the chat format, ending with ``Assistant:`` unless
  ``"add_generation_prompt": false``.
- ``/detokenize``: ``{"tokens": [ids]}`` gives ``{"content": TEXT, "prompt": TEXT}`` (llama.cpp
  reads ``content``, vLLM ``prompt``); invalid UTF-8 becomes U+FFFD.
- ``/tokenizer_info``: ``{"eos_token", "bos_token", "pad_token", "tokenizer", "vocab_size"}``,
  what lm-eval's remote tokenizer (``local-completions`` with ``tokenizer_backend=remote``)
  reads. The end-of-text token is id 0; ``eos_token``/``bos_token`` give its text where that
  text tokenizes back to id 0 alone (NUL in the byte vocabulary), else null (the World
  vocabulary's id 0 has no text: lm-eval then needs ``custom_prefix_token_id=0``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from . import protocol as P
from . import responses as R
from .metrics import CONTENT_TYPE
from .routes import read_json, server_of

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request):
    server = server_of(request)
    body = await read_json(request, server.config.max_request_bytes)
    P.check_model(body, [server.config.model_name])
    tok = server.tokenizer
    msgs = P.check_messages(body, required=False)
    if msgs is not None:
        gen = P.get_bool(body, "add_generation_prompt", True)
        ids = (await run_in_threadpool(P.render_messages, msgs, tok, gen)).ids
    else:
        name = "content" if "content" in body else "prompt"
        text = body.get(name)
        if not isinstance(text, str):
            raise P.bad("give the text to tokenize as 'content' (or 'prompt'), a string", name)
        ids = await run_in_threadpool(tok.encode, text)
    if P.get_bool(body, "with_pieces"):
        return {
            "tokens": [{"id": t, "piece": R.token_string(tok, t)} for t in ids],
            "count": len(ids),
        }
    return {"tokens": ids, "count": len(ids)}


@router.post("/detokenize")
async def detokenize(request: Request):
    server = server_of(request)
    body = await read_json(request, server.config.max_request_bytes)
    P.check_model(body, [server.config.model_name])
    ids = body.get("tokens")
    V = server.model.config.vocab_size
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids
    ):
        raise P.bad(f"'tokens' must be a list of token ids in 0..{V - 1}", "tokens")
    text = await run_in_threadpool(server.tokenizer.decode, ids)
    return {"content": text, "prompt": text}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    server = server_of(request)
    tok = server.tokenizer
    end = tok.decode([0])
    if not end or tok.encode(end) != [0]:
        end = None
    return {
        "eos_token": end,
        "bos_token": end,
        "pad_token": None,
        "tokenizer": tok.name,
        "vocab_size": server.model.config.vocab_size,
    }


@router.get("/metrics")
async def metrics(request: Request):
    return Response(server_of(request).metrics.render(), media_type=CONTENT_TYPE)
