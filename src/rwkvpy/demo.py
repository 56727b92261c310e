"""The demo model shipped inside the package, and the text it was trained and evaluated on.

The demo is a tiny byte-level RWKV-7 (vocabulary 256, token = byte) trained by
``tools/train_demo.py`` on text every Python installation carries: the standard library's
``pydoc_data/topics.py`` (the reference documentation that ``help()`` shows), its values
concatenated in sorted key order and encoded as UTF-8. The last part of it (from the first line
start at or after 95 % of the bytes) is held out for evaluation. The split lives here, in one
place, so the training script and any evaluation use the same bytes.

The demo also chats (``rwkvpy chat``, the server's ``/v1/chat/completions``): it was then
fine-tuned (``--init``, ``--chat-fraction``) on the documentation mixed with chat turns in the
format of :mod:`rwkvpy.chat` built here from the same installation (:func:`chat_turns`):
questions about each pydoc topic and section, each builtin and each method of the builtin types
("What does len do?"), answered with the first sentences of its text or docstring, and a few
greetings. Whole subjects are held out for evaluation, among them every subject whose answer
is in the held-out documentation, so chat training adds none of it.

The text differs between Python versions (each release updates its documentation), so a
perplexity is only comparable on the same Python version: :func:`corpus_info` and
:func:`chat_info` give a hash.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

from .errors import RwkvpyError

__all__ = [
    "HELDOUT_FRACTION",
    "DATA_DIR",
    "demo_corpus",
    "held_out_text",
    "corpus_info",
    "demo_model_path",
    "chat_pairs",
    "chat_turns",
    "render_turn",
    "held_out_chat_text",
    "chat_info",
]

# Fraction of the corpus (in bytes, at the end) held out for evaluation.
HELDOUT_FRACTION = 0.05

# Where the shipped model file lives: rwkvpy/data/demo-v7-<dims>.<ext>
DATA_DIR = Path(__file__).resolve().parent / "data"


def _corpus_bytes() -> bytes:
    from pydoc_data import topics

    return "".join(topics.topics[k] for k in sorted(topics.topics)).encode("utf-8")


def demo_corpus() -> tuple[bytes, bytes]:
    """(train_bytes, heldout_bytes): the pydoc topics text split for training and evaluation.

    The held-out part starts at the first line start at or after ``1 - HELDOUT_FRACTION`` of
    the bytes, so both parts are whole lines of valid UTF-8. Deterministic for a given Python.
    """
    data = _corpus_bytes()
    cut = int(len(data) * (1.0 - HELDOUT_FRACTION))
    nl = data.find(b"\n", cut)
    cut = len(data) if nl < 0 else nl + 1
    return data[:cut], data[cut:]


def held_out_text() -> str:
    """The evaluation text (the held-out part of :func:`demo_corpus`) as a string."""
    return demo_corpus()[1].decode("utf-8")


def corpus_info() -> dict:
    """Sizes and a SHA-256 of the corpus: what a perplexity was measured on."""
    train, held = demo_corpus()
    return {
        "train_bytes": len(train),
        "heldout_bytes": len(held),
        "sha256": hashlib.sha256(train + held).hexdigest()[:16],
    }


def demo_model_path() -> str:
    """Path of the demo model file shipped in the package (``rwkvpy/data/demo*.gguf``, else
    ``demo*.pth``). Raises :class:`~rwkvpy.errors.RwkvpyError` if the package holds none."""
    for pattern in ("demo*.gguf", "demo*.pth"):
        found = sorted(DATA_DIR.glob(pattern)) if DATA_DIR.is_dir() else []
        if found:
            return str(found[0])
    raise RwkvpyError(
        f"no demo model file in {DATA_DIR} (looked for demo*.gguf and demo*.pth): "
        "this installation of rwkvpy does not ship the demo model; train one with "
        "tools/train_demo.py and load it by path"
    )


# --------------------------------------------------------------------------------------------
# Chat turns: questions about Python answered with the first sentences of its own documentation
# --------------------------------------------------------------------------------------------

# Subjects held out of chat training besides those the held-out documentation covers: those
# whose answer's SHA-256 is 0 modulo this number (about one in ten; by the answer, so that
# subjects sharing one, such as bytes.index and bytes.rindex, are held out together).
CHAT_HELDOUT_MODULUS = 10

# Answers are the first sentences of a paragraph, at least this long where a paragraph allows
# (a one-line sentence alone says little), at most CHAT_MAX_ANSWER characters.
CHAT_MIN_ANSWER = 60
CHAT_MAX_ANSWER = 300

# A few turns about the model itself, so a greeting (the README's "Hi!") gets a fitting answer.
_SELF = (
    "I am rwkvpy's demo model, a tiny RWKV-7 that read Python's documentation. Ask me "
    "about Python's statements, built-in functions and types."
)
CHAT_GREETINGS = (
    (
        "greeting",
        ("Hi!", "Hello!", "Hi", "Hello", "Hey there.", "Good morning!"),
        "Hello! " + _SELF,
    ),
    ("who", ("Who are you?", "What are you?", "What can you do?", "Can you help me?"), _SELF),
    (
        "thanks",
        ("Thanks!", "Thank you.", "Thank you, that helps."),
        "You are welcome. Ask me anything else about Python.",
    ),
)

# Builtin types whose public methods become subjects ("What does str.upper do?").
_METHOD_TYPES = (str, bytes, list, tuple, dict, set, int, float)

_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\be\.g\.)(?<!\bi\.e\.)\s+(?=[A-Z\"“(*])")
_SIGNATURE = re.compile(r"^(async\s+)?[\w.]+\(.*\)\s*(-+>.*)?$")


def _join(paragraph: str) -> str:
    return " ".join(paragraph.split())


def _sentences(text: str) -> str:
    """The first sentence(s) of a one-line paragraph: at least CHAT_MIN_ANSWER characters where
    the paragraph allows, whole sentences, at most CHAT_MAX_ANSWER ('' if the first sentence is
    longer). A trailing colon (text that introduced a grammar rule or an example) ends it as a
    sentence."""
    parts = _SENTENCE_END.split(text)
    out = ""
    for p in parts:
        if out and p.count(" ") < 2:
            break  # a one- or two-word "sentence" ("Syntax:") introduces what follows
        cand = f"{out} {p}" if out else p
        if len(cand) > CHAT_MAX_ANSWER:
            break
        out = cand
        if len(out) >= CHAT_MIN_ANSWER:
            break
    out = out.strip()
    if out.endswith(":"):
        out = out[:-1].rstrip() + "."
    if out and out[-1] not in ".!?)":  # a property's docstring: "the real part of ..."
        out = out[0].upper() + out[1:] + "."
    return out


def _prose(para: str) -> str:
    """A paragraph of pydoc text as one line if it is prose, else '': grammar rules and code
    (indented), headings (underlined), signatures (``object.__len__(self)``), lists, notes in
    parentheses and version notes are not."""
    lines = para.strip("\n").split("\n")
    first = lines[0]
    if (
        not first.strip()
        or first.startswith((" ", "* ", "(", "["))
        or re.fullmatch(r"[=*-]+", first)
        or (len(lines) > 1 and re.fullmatch(r"[=*-]+", lines[1]))
        or re.match(r"(class |classmethod |staticmethod )?[\w.]+(\(.*\))?$", first)
        or re.match(r"(New|Changed|Added|Deprecated) in version", first)
    ):
        return ""
    text = _join(para)
    return text if text.count(" ") >= 4 else ""


def _topic_sections():
    """(topic key, title, first prose paragraph) of every pydoc topic and of every section in
    it (a title underlined with ``=``); in sorted topic order."""
    from pydoc_data import topics

    for key in sorted(topics.topics):
        lines = topics.topics[key].split("\n")
        heads = [(0, lines[0])] + [
            (i - 1, lines[i - 1])
            for i in range(2, len(lines))
            if re.fullmatch(r"=+", lines[i]) and len(lines[i]) == len(lines[i - 1])
        ]
        for n, (at, title) in enumerate(heads):
            end = heads[n + 1][0] if n + 1 < len(heads) else len(lines)
            for para in re.split(r"\n\s*\n", "\n".join(lines[at + 2 : end])):
                text = _prose(para)
                if text:
                    yield key, title, text
                    break


def _subject_phrase(title: str) -> str:
    """A section title as a user would write it: 'The "with" statement' -> 'the with
    statement', 'Mapping Types — "dict"' -> 'mapping types (dict)'. Capitalized words become
    lower case, except builtin names (None, Ellipsis) and 'Python'."""
    import builtins

    t = title.replace('"', "")
    t = re.sub(r"\s+—\s+(.*)", r" (\1)", t)
    words = []
    for w in t.split(" "):
        core = w.strip("(),")
        if (
            core[:1].isupper()
            and core[1:].islower()
            and core != "Python"
            and not hasattr(builtins, core)
        ):
            w = w.replace(core, core.lower())
        words.append(w)
    return " ".join(words)


def _is_plural(phrase: str) -> bool:
    """Whether a subject phrase takes 'are': its head noun (the last word before 'of', 'with',
    a comma or a parenthesis) ends in a plural s and is no builtin name ('Ellipsis'); a phrase
    led by a gerund ('customizing ...') does not."""
    import builtins

    words = re.split(r" of | with |,| \(", phrase)[0].split()
    if re.match(r"(customizing|emulating|implementing|invoking)$", words[0]):
        return False
    last = words[-1]
    return last.endswith("s") and not last.endswith("ss") and not hasattr(builtins, last)


def _topic_pairs():
    import keyword

    for key, title, text in _topic_sections():
        answer = _sentences(text)
        if not answer:
            continue
        s = _subject_phrase(title)
        be = "are" if _is_plural(s) else "is"
        qs = [f"What {be} {s}?", f"Tell me about {s}.", f"Can you explain {s}?"]
        if keyword.iskeyword(key) and (f'"{key}"' in title or title.lower().startswith(key)):
            qs.append(f"What does {key} do?")
        yield "topic:" + s.lower(), qs, answer


def _doc_answer(doc) -> str:
    """The first sentences of a docstring, signature lines (``len(obj) -> int``) skipped; ''
    if there is none."""
    if not isinstance(doc, str):
        return ""
    import inspect

    for para in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = [ln.strip() for ln in para.strip().split("\n")]
        if not lines[0] or all(_SIGNATURE.match(ln) for ln in lines):
            continue
        return _sentences(_join(para))
    return ""


# Lists the builtins and the builtin types' methods with their docstrings, run in a fresh
# isolated interpreter: libraries replace builtins in a running process (Ray's progress bars
# swap in their own ``print``), and the chat turns must be Python's, the same in any process.
_BUILTINS_PROBE = """
import builtins, inspect, json, sys
rows = []
for name in sorted(vars(builtins)):
    obj = getattr(builtins, name)
    if name.startswith("_") or not (inspect.isclass(obj) or inspect.isbuiltin(obj)):
        continue
    kind = ("exception" if inspect.isclass(obj) and issubclass(obj, BaseException)
            else "class" if inspect.isclass(obj) else "function")
    rows.append([kind, name, getattr(obj, "__doc__", None)])
for typ in (%s):
    for name in sorted(vars(typ)):
        if not name.startswith("_"):
            rows.append(["method", typ.__name__ + "." + name, getattr(getattr(typ, name), "__doc__", None)])
json.dump(rows, sys.stdout)
"""


@functools.cache
def _builtin_docs() -> tuple:
    """(kind, name, docstring) of every public builtin class and function and of every public
    method of :data:`_METHOD_TYPES`, from a fresh interpreter (see ``_BUILTINS_PROBE``); read
    once per process (the interpreter's builtins do not change)."""
    import json
    import subprocess
    import sys

    code = _BUILTINS_PROBE % ", ".join(t.__name__ for t in _METHOD_TYPES)
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    return tuple(tuple(row) for row in json.loads(out.stdout))


def _builtin_pairs():
    for kind, name, doc in _builtin_docs():
        answer = _doc_answer(doc)
        if not answer:
            continue
        if kind == "exception":
            qs = [f"What is {name}?", f"When is {name} raised?", f"What does {name} mean?"]
        elif kind == "class":
            qs = [f"What is {name}?", f"What does {name} do?", f"Tell me about {name}."]
        elif kind == "function":
            qs = [f"What does {name} do?", f"What does {name}() do?", f"What is {name} for?"]
        else:
            t, _, meth = name.partition(".")
            qs = [
                f"What does {name} do?",
                f"What does the {meth} method of {t} do?",
                f"How do I use {name}()?",
            ]
            yield f"method:{name}", qs, answer
            continue
        yield "builtin:" + name, qs, answer


def chat_pairs() -> list:
    """Every chat subject as ``(subject, questions, answer, held_out)``: the pydoc topics and
    their sections (questions from the title, answer from the first prose paragraph), the
    builtins and the methods of the builtin types (answer from the docstring), and a few
    greetings. A subject is held out when its answer occurs in the held-out documentation (so
    chat training adds none of it) or the answer's SHA-256 is 0 modulo CHAT_HELDOUT_MODULUS;
    greetings are never held out. Sorted by subject; deterministic for a given Python."""
    held = _join(held_out_text())
    out, seen = [], set()
    for subject, qs, answer in (*_topic_pairs(), *_builtin_pairs()):
        if subject in seen or "\n" in answer:
            continue
        seen.add(subject)
        h = int(hashlib.sha256(answer.encode("utf-8")).hexdigest(), 16)
        # the answer's last character may be a full stop that replaced the text's colon
        out.append(
            (subject, tuple(qs), answer, answer[:-1] in held or h % CHAT_HELDOUT_MODULUS == 0)
        )
    out += [("self:" + s, qs, a, False) for s, qs, a in CHAT_GREETINGS]
    return sorted(out)


def render_turn(question: str, answer: str) -> str:
    """One turn as the chat format has it (see :mod:`rwkvpy.chat`): the user's message, then
    ``Assistant:``, a space, the answer and the blank line that ends a reply."""
    from .chat import STOP, render_user

    return f"{render_user(question)} {answer}{STOP}"


def chat_turns() -> tuple[list, list]:
    """(train_turns, heldout_turns): every question of every subject of :func:`chat_pairs`
    rendered by :func:`render_turn`, in subject order."""
    train, held = [], []
    for _subject, qs, answer, held_out in chat_pairs():
        (held if held_out else train).extend(render_turn(q, answer) for q in qs)
    return train, held


def held_out_chat_text() -> str:
    """The held-out chat turns as one conversation (the evaluation text for chat)."""
    return "".join(chat_turns()[1])


def chat_info() -> dict:
    """Counts and a SHA-256 of the chat turns: what a chat perplexity was measured on."""
    train, held = chat_turns()
    return {
        "train_turns": len(train),
        "heldout_turns": len(held),
        "train_bytes": len("".join(train).encode("utf-8")),
        "heldout_bytes": len("".join(held).encode("utf-8")),
        "sha256": hashlib.sha256("".join(train + held).encode("utf-8")).hexdigest()[:16],
    }
