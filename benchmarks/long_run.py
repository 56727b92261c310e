"""A long run in one state (issue 23, docs/reliability.md): decode N tokens (default 1,000,000)
with the demo model, each token sampled from the previous logits and fed back, the state carried
the whole way. Checks that the logits stay finite, and reports per block of tokens the speed,
the process's RSS (flat memory, steady speed) and how many distinct tokens the block drew.

Sampling: temperature 1, top-p 0.9 and ChatRWKV's repetition penalties (presence and frequency
0.25, decay 0.996). Without the penalties the demo's text settles within a few thousand tokens
into one character repeated, and the state stays at a fixed point for the rest of the run;
``--presence-penalty 0 --frequency-penalty 0`` runs it so.

    python -m benchmarks.long_run --tokens 1000000 --block 50000
    python -m benchmarks.long_run --tokens 100000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main(argv=None):
    os.environ.setdefault("RWKVPY_BACKGROUND_COMPILE", "0")  # time the kernels, not a first run
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.long_run", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="demo")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--block", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--presence-penalty", type=float, default=0.25)
    p.add_argument("--frequency-penalty", type=float, default=0.25)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    import torch

    import rwkvpy
    from rwkvpy.sampling import Sampler, SamplingParams

    model = rwkvpy.load(a.model)
    sampler = Sampler(
        SamplingParams(
            temperature=1.0,
            top_p=0.9,
            presence_penalty=a.presence_penalty,
            frequency_penalty=a.frequency_penalty,
            seed=a.seed,
        )
    )
    logits, state = model.forward([0])
    rows, done, t0 = [], 0, time.monotonic()
    block_t, block_cpu = t0, time.process_time()
    ok = True
    distinct: set = set()
    while done < a.tokens:
        tok = sampler.sample(logits)
        distinct.add(tok)
        logits, state = model.forward([tok], state)
        done += 1
        if done % a.block == 0 or done == a.tokens:
            finite = bool(torch.isfinite(logits).all())
            ok &= finite
            now, cpu = time.monotonic(), time.process_time()
            n = done - (rows[-1]["tokens"] if rows else 0)
            rows.append(
                {
                    "tokens": done,
                    "tokens_per_s": round(n / (now - block_t), 1),
                    "cpu_s_per_wall_s": round((cpu - block_cpu) / (now - block_t), 2),
                    "rss_mb": round(rss_mb(), 1),
                    "logits_finite": finite,
                    "logit_abs_max": round(float(logits.abs().max()), 2),
                    "state_n_tokens": state.n_tokens,
                    "distinct_tokens": len(distinct),
                }
            )
            distinct = set()
            block_t, block_cpu = now, cpu
            if not a.json:
                print(rows[-1], flush=True)
            if not finite:
                break
    out = {
        "model": a.model,
        "presence_penalty": a.presence_penalty,
        "frequency_penalty": a.frequency_penalty,
        "tokens": done,
        "seconds": round(time.monotonic() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "all_finite": ok,
        "blocks": rows,
    }
    print(json.dumps(out) if a.json else {k: v for k, v in out.items() if k != "blocks"})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
