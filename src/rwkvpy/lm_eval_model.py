"""rwkvpy as a model of EleutherAI's lm-evaluation-harness (``pip install 'rwkvpy[eval]'``).

:class:`RwkvpyLM` answers lm-eval's three kinds of request with rwkvpy's public API
(``rwkvpy.load``, ``Model.forward`` / ``forward_batch``, the model's tokenizer,
:func:`rwkvpy.generate.generate` and :func:`rwkvpy.perplexity.perplexity`). ``rwkvpy eval`` runs
it; from Python::

    import lm_eval
    from rwkvpy.lm_eval_model import RwkvpyLM

    lm = RwkvpyLM("model.gguf", batch_size=16)      # or RwkvpyLM(rwkvpy.load(...))
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai", "arc_easy"])

Importing this module also registers the class with lm-eval as ``rwkvpy``, for
``simple_evaluate(model="rwkvpy", model_args="model=demo,batch_size=16", ...)``.

What each request computes:

- ``loglikelihood(context, continuation)``: the sum of the log probabilities of the
  continuation's tokens after the context, and whether greedy decoding would have produced each
  of them (``is_greedy``). An empty context is the prefix token alone (below). Requests that
  share a context run it once: an RNN's state after the context is all any continuation needs,
  so a multiple-choice question with four answers reads its question once, not four times.
  A continuation of one token needs no model call at all (the context's last logits score it);
  longer ones are stepped one token at a time, up to ``batch_size`` continuations side by side
  in one ``forward_batch`` call (the model's batched one-token step).
- ``loglikelihood_rolling(text)``: the log likelihood of a whole document, every token scored
  once, conditioned on the prefix token. lm-eval cuts documents longer than a transformer's
  context into overlapping windows; an RNN's state carries everything read so far, so a
  document of any length is one pass, the state carried from chunk to chunk
  (:func:`rwkvpy.perplexity.perplexity` on ``[prefix] + tokens``, whose ``nll_sum`` it is:
  ``rwkvpy perplexity`` on the same tokens gives the same number).
- ``generate_until(context, {"until": [...], "max_gen_toks": N, ...})``: greedy decoding
  with the ``until`` strings as stop strings, at most ``max_gen_toks`` tokens, and the
  end-of-text token as a stop token; ``do_sample=True`` samples with the request's
  ``temperature`` / ``top_p`` / ``top_k`` instead. ``batch_size`` requests at a time: each
  reads its prompt alone, then each step decodes one token of every unfinished one in one
  ``forward_batch`` call. Each sequence goes through :class:`rwkvpy.generation.TokenLoop`, the
  loop of :func:`rwkvpy.generate.generate` and of the server, so the text is what
  ``rwkvpy.generate`` gives for that request alone.

The prefix token: lm-eval conditions documents and empty contexts on a start token. RWKV models
are trained with token 0 between documents (``<|endoftext|>`` of the World and 20B
vocabularies), so ``prefix_token`` is 0 by default. In a byte-level vocabulary token 0 is the NUL
byte, which a model trained on plain text (the demo) never saw: each document then starts from a
state it does not know, and ``prefix_token=10`` (a newline) measures it better (docs/scoring.md
has the numbers).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

# lm_eval.models first: lm-eval registers its own models (lazily) only while its registry is
# empty, so registering this one before them would leave their names unknown
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

import rwkvpy

from .errors import RwkvpyError

#: RWKV's end-of-text token (World and 20B vocabularies; NUL in a byte vocabulary): the default
#: prefix token, and a stop token of generate_until.
END_OF_TEXT = 0

#: Continuations up to this many tokens are stepped side by side with other requests'
#: (forward_batch); longer ones run alone in sequence mode, which is faster per token.
STEP_MAX_TOKENS = 16


class LmEvalError(RwkvpyError):
    """Bad arguments to the lm-eval model (a batch size below 1, an unknown argument)."""


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


@register_model("rwkvpy")
class RwkvpyLM(TemplateLM):
    """An lm-eval model backed by an rwkvpy :class:`~rwkvpy.Model`.

    model: a loaded :class:`rwkvpy.Model`, or a model reference for :func:`rwkvpy.load` (a
    file, ``demo``, ``hf:OWNER/REPO/FILE``; ``pretrained=`` is taken as a synonym, as lm-eval's
    own models name it). batch_size: continuations stepped side by side. prefix_token: the token
    documents and empty contexts are conditioned on. max_gen_toks: the default cap on generated
    tokens. progress: a progress bar on stderr. mode, threads, device: as for rwkvpy.load.
    """

    def __init__(
        self,
        model="demo",
        pretrained=None,
        batch_size=16,
        prefix_token=0,
        max_gen_toks=256,
        progress=True,
        mode="fast",
        threads=None,
        device="cpu",
        **unused,
    ):
        super().__init__()
        unused.pop("max_batch_size", None)  # lm-eval passes its own defaults along
        unused.pop("device_map", None)
        if unused:
            raise LmEvalError(
                f"unknown argument(s) of the rwkvpy lm-eval model: {', '.join(sorted(unused))}"
            )
        if pretrained is not None:
            model = pretrained
        if not isinstance(model, rwkvpy.Model):
            model = rwkvpy.load(
                model, mode=mode, device=device, threads=None if threads is None else int(threads)
            )
        self.model = model
        self.tok = model.tokenizer()
        self.batch_size = self._positive("batch_size", batch_size)
        self.max_gen_toks = self._positive("max_gen_toks", max_gen_toks)
        self.prefix_token = self._index("prefix_token", prefix_token)
        if not 0 <= self.prefix_token < model.config.vocab_size:
            raise LmEvalError(
                f"prefix_token {self.prefix_token} is outside the vocabulary "
                f"(0..{model.config.vocab_size - 1})"
            )
        self.progress = _bool(progress)
        self._device = str(model.device)

    @staticmethod
    def _index(name, v) -> int:
        try:
            return int(v)
        except (TypeError, ValueError):
            raise LmEvalError(f"{name} must be an integer, got {v!r}") from None

    @staticmethod
    def _positive(name, v) -> int:
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise LmEvalError(f"{name} must be an integer, got {v!r}") from None
        if n < 1:
            raise LmEvalError(f"{name} must be at least 1, got {n}")
        return n

    # -- what TemplateLM asks for ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return END_OF_TEXT

    @property
    def prefix_token_id(self) -> int:
        return self.prefix_token

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit="req",
            disable=not self.progress or total == 0,
            leave=False,
            dynamic_ncols=True,
        )

    # -- loglikelihood ------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``requests``: ((context, continuation), context ids, continuation ids) each; the
        (log likelihood, is_greedy) of each, in order."""
        groups: OrderedDict = OrderedDict()  # context ids -> request indices, first seen first
        for i, (_, ctx, _cont) in enumerate(requests):
            if not ctx:
                raise LmEvalError("a loglikelihood request has no context tokens")
            groups.setdefault(tuple(ctx), []).append(i)
        out: list = [None] * len(requests)
        bar = self._bar(len(requests), "loglikelihood")
        pending: list = []  # (request index, state after the context, its last logits, ids)
        try:
            for ctx, members in groups.items():
                logits, state = self.model.forward(list(ctx))
                for i in members:
                    cont = requests[i][2]
                    if not cont:
                        out[i] = (0.0, True)
                        bar.update(1)
                    elif len(cont) > STEP_MAX_TOKENS:
                        out[i] = self._score_sequence(logits, state, cont)
                        bar.update(1)
                    else:
                        pending.append((i, state, logits, cont))
                if len(pending) >= self.batch_size:
                    self._score_stepped(pending, out, bar)
                    pending = []
            self._score_stepped(pending, out, bar)
        finally:
            bar.close()
        for (key, _, _), r in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return out

    @staticmethod
    def _token_scores(rows: torch.Tensor, targets: list) -> tuple[float, bool]:
        """(sum of log p(target), every target the argmax) for logits ``rows`` (T, vocab)."""
        rows = rows.float()
        t = torch.tensor(targets, dtype=torch.long, device=rows.device).unsqueeze(1)
        logp = torch.log_softmax(rows, dim=-1).gather(1, t).squeeze(1)
        greedy = bool((rows.argmax(dim=-1) == t.squeeze(1)).all())
        return float(logp.double().sum()), greedy

    def _score_sequence(self, first_logits, state, cont) -> tuple[float, bool]:
        """A long continuation alone: sequence mode, all logits, the state carried."""
        rows = [first_logits.unsqueeze(0)]
        chunk = self.model.prompt_chunk or 512
        feed = cont[:-1]
        for a in range(0, len(feed), chunk):
            lg, state = self.model.forward(feed[a : a + chunk], state, all_logits=True)
            rows.append(lg)
        return self._token_scores(torch.cat(rows), cont)

    def _score_stepped(self, jobs, out, bar) -> None:
        """Short continuations side by side: each step feeds every unfinished continuation its
        next token in one ``forward_batch`` call."""
        if not jobs:
            return
        rows = [[lg] for _, _, lg, _ in jobs]
        states = [s for _, s, _, _ in jobs]
        for step in range(max(len(c) for _, _, _, c in jobs) - 1):
            live = [j for j, (_, _, _, c) in enumerate(jobs) if step + 1 < len(c)]
            logits, new = self.model.forward_batch(
                [[jobs[j][3][step]] for j in live], [states[j] for j in live]
            )
            for j, lg, s in zip(live, logits, new):
                rows[j].append(lg)
                states[j] = s
        for (i, _, _, cont), r in zip(jobs, rows):
            out[i] = self._token_scores(torch.stack(r), cont)
            bar.update(1)

    # -- rolling loglikelihood ----------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log likelihood in one pass (see the module's docstring)."""
        from .perplexity import perplexity

        out = []
        bar = self._bar(len(requests), "loglikelihood_rolling")
        try:
            for req in requests:
                (text,) = req.args
                ids = self.tok.encode(text)
                ll = -perplexity(self.model, [self.prefix_token] + ids).nll_sum if ids else 0.0
                out.append(ll)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
                bar.update(1)
        finally:
            bar.close()
        return out

    # -- generation ----------------------------------------------------------------------------
    def _params(self, kw: dict):
        from .sampling import SamplingParams

        kw = dict(kw or {})
        until = kw.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        max_tokens = self._positive("max_gen_toks", kw.pop("max_gen_toks", self.max_gen_toks))
        sample = _bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        common: dict[str, Any] = {
            "stop": tuple(until),
            "stop_tokens": (END_OF_TEXT,),
            "max_tokens": max_tokens,
            "penalty_decay": 1.0,
        }
        if not sample or temperature == 0.0:
            return SamplingParams(greedy=True, **common)
        return SamplingParams(
            temperature=temperature,
            top_p=float(kw.pop("top_p", 1.0)),
            top_k=int(kw.pop("top_k", 0) or 0),
            seed=kw.pop("seed", 1234),
            **common,
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) text for each request, ``batch_size`` sequences at a time: each
        reads its prompt alone, then every step decodes one token of each unfinished sequence in
        one ``forward_batch`` call. Each sequence's tokens, stops and text are handled by
        :class:`rwkvpy.generation.TokenLoop`, the loop of ``rwkvpy.generate`` and the server."""
        out: list = [None] * len(requests)
        bar = self._bar(len(requests), "generate_until")
        try:
            for a in range(0, len(requests), self.batch_size):
                for i, text in self._generate_batch(requests, range(a, a + self.batch_size)):
                    out[i] = text
                    context, kw = requests[i].args[0], requests[i].args[1]
                    self.cache_hook.add_partial("generate_until", (context, kw), text)
                    bar.update(1)
        finally:
            bar.close()
        return out

    def _generate_batch(self, requests, indices):
        """Yields (request index, generated text) as each of ``indices`` finishes."""
        from .generation import TokenLoop

        live = []  # [request index, loop, logits, state, text pieces]
        for i in indices:
            if i >= len(requests):
                break
            context, kw = requests[i].args[0], requests[i].args[1]
            ids = self.tok.encode(context) or [self.prefix_token]
            logits, state = self.model.forward(ids)
            live.append([i, TokenLoop(self.tok, self._params(kw)), logits, state, []])
        while live:
            stepping = []
            for seq in live:
                token = None if seq[1].done else seq[1].choose(seq[2])
                if token is None:
                    last = seq[1].close()
                    yield seq[0], "".join(seq[4]) + (last.text if last is not None else "")
                else:
                    stepping.append((seq, token))
            if stepping:
                logits, states = self.model.forward_batch(
                    [[t] for _, t in stepping], [seq[3] for seq, _ in stepping]
                )
                for (seq, token), lg, st in zip(stepping, logits, states):
                    seq[2], seq[3] = lg, st
                    event = seq[1].accept(token)
                    if event is not None:
                        seq[4].append(event.text)
            live = [seq for seq, _ in stepping]
