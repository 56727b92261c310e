"""The text commands of the ``rwkvpy`` command line: ``generate``, ``chat`` and ``tokenize``.

``add_text_commands(subparsers)`` adds them to an argparse subparsers object (:mod:`rwkvpy.cli.main`'s
``build_parser`` calls it); each sets ``func`` to a function taking the parsed arguments and
returning the exit status. User errors are raised as :class:`~rwkvpy.errors.RwkvpyError`
subclasses, for the caller to print as one line.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any

from ..errors import RwkvpyError
from .options import add_model_argument, add_run_options, add_tokenizer_options, run_options

CHAT_HELP = (
    "commands: /reset (forget the conversation), /regen (a new reply to the last "
    "message), /save FILE, /load FILE, /quit; Ctrl-C stops a reply"
)


class CliError(RwkvpyError):
    """A command-line usage error (a missing model, a missing file, a bad combination)."""


# -- shared pieces --------------------------------------------------------------------------
def _unescape(s: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` in a command-line string (for --stop)."""
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] in "ntr\\":
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[s[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def decode_utf8(raw: bytes, name: str) -> str:
    """``raw`` as UTF-8 text; a TokenizerError naming the byte offset of the first bad byte."""
    from ..tokenizers import TokenizerError

    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(
            f"{name}: invalid UTF-8 at byte offset {e.start} "
            f"(byte 0x{raw[e.start]:02x}: {e.reason})"
        ) from None


def _read_text(path: str) -> str:
    if path == "-":
        return decode_utf8(sys.stdin.buffer.read(), "<stdin>")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory, expected a text file") from None
    return decode_utf8(raw, path)


def _model_spec(args) -> str:
    """The model spec given with -m, or the built-in demo model's path."""
    if args.model is not None:
        return args.model
    try:
        demo = importlib.import_module("rwkvpy.demo")
    except ModuleNotFoundError as e:
        if e.name != "rwkvpy.demo":
            raise
        raise CliError("no model given: use -m MODEL") from None
    path = os.fspath(demo.demo_model_path())
    if not getattr(args, "quiet", False):
        print(f"using the built-in demo model ({path})", file=sys.stderr)
    return path


def _tokenizer(kind, vocab_path, vocab_size):
    """The tokenizer for a model of ``vocab_size`` (None: no model, ``kind`` is required)."""
    from ..tokenizers import ByteTokenizer, NeoXTokenizer, WorldTokenizer, tokenizer_for

    if vocab_size is not None:
        return tokenizer_for(vocab_size, kind, vocab_path)
    if kind is None:
        raise CliError("give -m MODEL or --tokenizer world|neox|bytes")
    if kind == "bytes":
        if vocab_path is not None:
            raise CliError("the bytes tokenizer takes no --vocab")
        return ByteTokenizer()
    if kind == "world":
        return WorldTokenizer(vocab_path)
    return NeoXTokenizer(vocab_path)


def _load(args):
    """(model, tokenizer) from -m (or the demo model), --mode, --threads, --tokenizer, --vocab."""
    import rwkvpy

    from ..hub import resolve_model

    path = resolve_model(_model_spec(args))
    if not os.path.exists(path):
        raise CliError(f"{path}: no such model file")
    model = rwkvpy.load(path, **run_options(args))
    return model, model.tokenizer(args.tokenizer, args.vocab)


def _params(args):
    from ..sampling import SamplingParams

    given = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty,
        "penalty_decay": args.penalty_decay,
        "seed": args.seed,
    }
    kw = {k: v for k, v in given.items() if v is not None}
    if args.stop:
        kw["stop"] = tuple(_unescape(s) for s in args.stop)
    if args.greedy:
        kw["greedy"] = True
    if getattr(args, "json_schema", None) is not None:
        kw["json_schema"] = _read_text(args.json_schema)
    if getattr(args, "grammar", None) is not None:
        kw["grammar"] = _read_text(args.grammar)
    if getattr(args, "json_object", False):
        kw["json_object"] = True
    try:
        return SamplingParams(**kw)
    except RwkvpyError as e:  # a bad schema or grammar names its file
        what = args.json_schema or args.grammar if kw.keys() & {"json_schema", "grammar"} else None
        raise CliError(f"{what}: {e}" if what else str(e)) from None


def _utf8_stdout():
    for f in (sys.stdout, sys.stderr):
        try:
            f.reconfigure(errors="replace")
        except (AttributeError, ValueError):  # pragma: no cover - replaced streams
            pass


def _add_model_options(p, *rest, model_help: str) -> None:
    add_model_argument(p, *rest, required=False, help=model_help)
    add_tokenizer_options(p)


def _add_sampling_options(p) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate (256)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass, (0, 1] (default 1)")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely (0 = all)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the best")
    g.add_argument("--presence-penalty", type=float, default=None, help="BlinkDL alpha_presence")
    g.add_argument("--frequency-penalty", type=float, default=None, help="BlinkDL alpha_frequency")
    g.add_argument(
        "--penalty-decay",
        type=float,
        default=None,
        help="BlinkDL alpha_decay, (0, 1] (default 0.996)",
    )
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible output")
    g.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop at this text (repeatable; \\n, \\t, \\r and \\\\ are unescaped)",
    )
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    s = g.add_mutually_exclusive_group()
    s.add_argument(
        "--json-schema",
        metavar="FILE",
        default=None,
        help="the output is JSON valid under this JSON schema (needs rwkvpy[structured])",
    )
    s.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    s.add_argument(
        "--grammar",
        metavar="FILE",
        default=None,
        help="the output follows this grammar (GBNF or Lark)",
    )


# -- generate -------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from ..generate import generate, stream
    from ..state import State

    _utf8_stdout()
    if args.save_state:  # before any work: a missing folder found after generating wastes it
        from ..formats.atomic import check_writable

        check_writable(args.save_state)
    model, tok = _load(args)
    params = _params(args)
    state = State.from_file(args.state, model) if args.state else None
    prompt = _read_text("-") if args.prompt == "-" else args.prompt
    if args.json:
        r: Any = generate(model, tok, prompt, params, state=state)
        t = r.timings
        print(
            json.dumps(
                {
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens,
                    "prompt_tokens_per_s": round(t.prompt_tokens_per_second, 3),
                    "tokens_per_s": round(t.tokens_per_second, 3),
                    "seconds": round(t.total_seconds, 6),
                    "seed": r.seed,
                },
                ensure_ascii=False,
            )
        )
    else:
        s = stream(model, tok, prompt, params, state=state)
        out = sys.stdout
        for piece in s:
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        r = s.result
        if not args.quiet:
            t = r.timings
            compiled = (
                f", {t.compile_seconds:.1f} s of it compiling kernels (first run), not "
                "in the speeds"
                if t.compile_seconds >= 0.05
                else ""
            )
            print(
                f"[{r.prompt_tokens} prompt tokens, {t.prompt_tokens_per_second:.1f} tokens/s; "
                f"{r.completion_tokens} generated, {t.tokens_per_second:.1f} tokens/s; "
                f"{t.total_seconds:.2f} s{compiled}; finish: {r.finish_reason}; seed {r.seed}]",
                file=sys.stderr,
            )
    if args.save_state:
        r.state.save(args.save_state)
    return 0


# -- chat -----------------------------------------------------------------------------------
def _show_reply(reply, out) -> None:
    out.write("Assistant: ")
    out.flush()
    interrupted = False
    try:
        for piece in reply:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        reply.close()  # commits what was shown (see rwkvpy.chat)
        interrupted = True
    out.write("\n")
    out.flush()
    if interrupted:
        print("[reply interrupted]", file=sys.stderr)
    out.write("\n")
    out.flush()


def cmd_chat(args) -> int:
    from ..chat import ChatSession

    _utf8_stdout()
    model, tok = _load(args)
    session = ChatSession(model, tok, _params(args), system=args.system)
    interactive = sys.stdin.isatty()
    out, err = sys.stdout, sys.stderr
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:  # pragma: no cover - not on every platform
            pass
        if not args.quiet:
            print(f"chatting with {os.path.basename(model.info.path)}; {CHAT_HELP}", file=err)
    failed = False
    while True:
        try:
            if interactive:
                line = input("User: ")
            else:
                line = sys.stdin.readline()
                if not line:
                    break
        except EOFError:
            break
        except KeyboardInterrupt:
            out.write("\n")
            break
        line = line.strip()
        if not line:
            continue
        if not line.startswith("/"):
            _show_reply(session.say(line), out)
            continue
        cmd, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        try:
            if cmd in ("quit", "exit", "q"):
                break
            elif cmd == "reset":
                session.reset()
                print("[conversation reset]", file=err)
            elif cmd in ("regen", "regenerate"):
                _show_reply(session.regenerate(), out)
            elif cmd == "save":
                if not arg:
                    raise CliError("/save needs a file name: /save FILE")
                session.save(arg)
                print(f"[saved the conversation to {arg}]", file=err)
            elif cmd == "load":
                if not arg:
                    raise CliError("/load needs a file name: /load FILE")
                session.load(arg)
                print(f"[loaded {arg}: {len(session.messages)} messages]", file=err)
            elif cmd == "help":
                print(CHAT_HELP, file=err)
            else:
                raise CliError(f"unknown command /{cmd}: {CHAT_HELP}")
        except (RwkvpyError, OSError) as e:
            failed = True
            print(f"rwkvpy: error: {e}", file=err)
    out.flush()
    return 1 if failed else 0


# -- tokenize -------------------------------------------------------------------------------
def cmd_tokenize(args) -> int:
    vocab_size = None
    if args.model is not None:
        import rwkvpy

        from ..hub import resolve_model

        path = resolve_model(args.model)
        if not os.path.exists(path):
            raise CliError(f"{path}: no such model file")
        from ..formats.vocabulary import model_tokenizer

        tok = model_tokenizer(path, rwkvpy.inspect(path).vocab_size, args.tokenizer, args.vocab)
    else:
        tok = _tokenizer(args.tokenizer, args.vocab, vocab_size)
    ids = tok.encode(_read_text(args.file))
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))
    return 0


# -- wiring ---------------------------------------------------------------------------------
def add_text_commands(subparsers) -> None:
    """Add ``generate``, ``chat`` and ``tokenize`` to an argparse subparsers object."""
    model_help = (
        "model file, or hf:OWNER/REPO/FILE from the Hugging Face Hub (default: the "
        "built-in demo model, when installed)"
    )
    g = subparsers.add_parser(
        "generate",
        help="continue a prompt, streaming the text to stdout",
        description="Continue PROMPT with the model and stream the text to stdout, followed by "
        "a newline; timings go to stderr (not with --quiet).",
    )
    _add_model_options(
        g, "prompt", model_help=model_help + "; then PROMPT: the prompt text ('-': read stdin)"
    )
    add_run_options(g)
    _add_sampling_options(g)
    g.add_argument(
        "--state",
        metavar="FILE",
        default=None,
        help="start from this state: an rwkvpy state file or a BlinkDL state-tuned .pth",
    )
    g.add_argument(
        "--save-state",
        metavar="FILE",
        default=None,
        help="save the state after the prompt and the generated text",
    )
    g.add_argument("--quiet", action="store_true", help="no messages on stderr")
    g.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: text, finish_reason, prompt_tokens, "
        "completion_tokens, prompt_tokens_per_s, tokens_per_s, seconds, seed",
    )
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser(
        "chat",
        help="chat with the model in the terminal",
        description="Chat in the RWKV format (User: ... / Assistant: ...). Reads one message "
        "a line from stdin (a terminal or a pipe) until EOF. " + CHAT_HELP + ".",
    )
    _add_model_options(c, model_help=model_help)
    add_run_options(c)
    _add_sampling_options(c)
    c.add_argument("--system", metavar="TEXT", default=None, help="a system prompt")
    c.add_argument("--quiet", action="store_true", help="no banner")
    c.set_defaults(func=cmd_chat)

    t = subparsers.add_parser(
        "tokenize",
        help="print the token ids of a text file",
        description="Print the token ids of FILE (UTF-8 text; '-': stdin), space-separated or "
        "as a JSON list.",
    )
    add_model_argument(
        t,
        "file",
        required=False,
        help="use this model's tokenizer (the one its file names, else its "
        "vocabulary size picks it); then FILE: UTF-8 text ('-': stdin)",
    )
    add_tokenizer_options(t, "tokenizer kind (with -m: must fit the model)")
    t.add_argument("--json", action="store_true", help="print a JSON list")
    t.set_defaults(func=cmd_tokenize)
