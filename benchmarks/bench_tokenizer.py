"""Tokenizer speed on one core: encode and decode, in MB/s of UTF-8 text and tokens/s, best of 3.

    python benchmarks/bench_tokenizer.py [--kind world|neox] [--vocab PATH] [--reference]
                                         [TEXT_FILE]

Default: the World tokenizer with the vocabulary rwkvpy ships. Without TEXT_FILE: Python's own
reference documentation (pydoc_data.topics), repeated to 4 MB. ``--reference`` also times
BlinkDL's reference tokenizer (``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``, World only) or the
``tokenizers`` library's own encode (NeoX) on the same text, and checks the ids are the same.
"""

import argparse
import time

from rwkvpy.tokenizers import default_world_vocab_path, tokenizer_for


def best_of(fn, n=3):
    best, out = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", nargs="?", help="UTF-8 text file (default: Python's docs, 4 MB)")
    ap.add_argument("--kind", choices=("world", "neox"), default="world")
    ap.add_argument("--vocab", default=None, help="vocabulary file (default: the shipped one)")
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also time the reference implementation and compare the ids",
    )
    args = ap.parse_args()
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        import pydoc_data.topics as t

        text = "\n\n".join(t.topics[k] for k in sorted(t.topics))
        text = text * (4_000_000 // len(text) + 1)
    tok = tokenizer_for(65536 if args.kind == "world" else 50277, args.kind, args.vocab)
    tok.encode(text[:1000])  # compile / load the cached kernel
    n = len(text.encode("utf-8"))
    enc, ids = best_of(lambda: tok.encode(text))
    dec, _ = best_of(lambda: tok.decode(ids))
    print(f"{tok.name}: {n / 1e6:.1f} MB, {len(ids):,} tokens ({n / len(ids):.2f} bytes/token)")
    print(f"  encode {n / enc / 1e6:6.1f} MB/s  {len(ids) / enc / 1e6:5.2f} M tokens/s")
    print(f"  decode {n / dec / 1e6:6.1f} MB/s  {len(ids) / dec / 1e6:5.2f} M tokens/s")
    if args.reference:
        if args.kind == "world":
            from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

            ref = TRIE_TOKENIZER(str(args.vocab or default_world_vocab_path()))
            name = "reference (rwkv TRIE_TOKENIZER)"
            t, ref_ids = best_of(lambda: ref.encode(text), n=1)
        else:
            name = "tokenizers library"
            t, enc_out = best_of(lambda: tok._tok.encode(text), n=1)
            ref_ids = enc_out.ids
        print(
            f"  {name} encode {n / t / 1e6:6.2f} MB/s  {len(ref_ids) / t / 1e6:5.2f} "
            f"M tokens/s; same ids: {ref_ids == ids}"
        )


if __name__ == "__main__":
    main()
