"""World tokenizer encoding speed (MB/s of UTF-8 input, one core), best of 3.

    python benchmarks/bench_tokenizer.py VOCAB_FILE [TEXT_FILE]

Without TEXT_FILE: Python's own reference documentation (pydoc_data.topics), repeated to 4 MB.
"""

import sys
import time

from rwkvpy.tokenizers import WorldTokenizer


def main():
    tok = WorldTokenizer(sys.argv[1])
    if len(sys.argv) > 2:
        text = open(sys.argv[2], encoding="utf-8").read()
    else:
        import pydoc_data.topics as t
        text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
        text = text * (4_000_000 // len(text) + 1)
    tok.encode(text[:1000])  # compile / load the cached kernel
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        ids = tok.encode(text)
        best = min(best, time.perf_counter() - t)
    n = len(text.encode("utf-8"))
    print(f"{n / best / 1e6:.1f} MB/s over {n / 1e6:.1f} MB ({n / len(ids):.2f} bytes/token)")


if __name__ == "__main__":
    main()
