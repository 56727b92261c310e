"""``rwkvpy eval`` and rwkvpy's lm-evaluation-harness model (rwkvpy.lm_eval_model) on the demo
model, offline: the tasks are written here in lm-eval's YAML format over local JSONL files (a
multiple-choice task, a LAMBADA-style last-word task and a rolling-perplexity task). Every
number is checked against the model's own logits (``Model.forward`` over the whole text) or
against ``rwkvpy perplexity``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the eval extra (in the test extra)

import rwkvpy
from rwkvpy.generate import generate
from rwkvpy.lm_eval_model import STEP_MAX_TOKENS, RwkvpyLM
from rwkvpy.sampling import SamplingParams

MC = [
    ("What does len return?", ["the number of items", "a new list", "nothing", "an error"], 0),
    ("Which keyword defines a function?", ["class", "def", "lambda", "import"], 1),
    (
        "Where does print write its text?",
        ["to a file on disk", "to the network", "to standard output", "to memory"],
        2,
    ),
    ("Which statement leaves a loop?", ["continue", "pass", "yield", "break"], 3),
    (
        "What does a dictionary map?",
        ["keys to values", "files to folders", "bits to bytes", "names to numbers"],
        0,
    ),
]
LAST_WORD = [
    (
        "The return statement leaves the current function call with the expression list as the "
        "return value"
    ),
    (
        "A for loop iterates over the items of any sequence, in the order that they appear in the "
        "sequence"
    ),
    "The pass statement is a null operation: when it is executed, nothing happens",
]
GEN = [  # (prompt, reference): greedy generation up to a full stop, compared whole
    ('The "while" statement is used for', " each"),
    ('The "if" statement is used for', " conditional execution"),
    ('The "try" statement specifies', " exception handlers and/or cleanup code"),
]
DOCS = [  # the rolling task's document: more than one 512-token chunk of the byte vocabulary
    (
        "The while statement is used for repeated execution as long as an expression is true. "
        "It repeatedly tests the expression and, if it is true, executes the first suite; if the "
        "expression is false (which may be the first time it is tested) the suite of the else "
        "clause, if present, is executed and the loop terminates. A break statement executed in "
        "the first suite terminates the loop without executing the else clause's suite. A "
        "continue statement executed in the first suite skips the rest of the suite and goes "
        "back to testing the expression. Objects are Python's abstraction for data."
    ),
]
# lm-eval's own defaults, spelled out so that it has nothing to warn about
TASKS = {
    "tiny_mc": (
        "mc.jsonl",
        """\
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: answer
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""",
    ),
    "tiny_last_word": (
        "last_word.jsonl",
        """\
output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
""",
    ),
    "tiny_gen": (
        "gen.jsonl",
        """\
output_type: generate_until
doc_to_text: "{{prompt}}"
doc_to_target: "{{reference}}"
generation_kwargs: {until: [".", ":", "\\n"], max_gen_toks: 24, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
""",
    ),
    "tiny_rolling": (
        "docs.jsonl",
        """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""",
    ),
}


def write_tasks(folder) -> str:
    """The three tasks' JSONL and YAML files in ``folder``; the folder, for --include-path."""
    rows = {
        "mc.jsonl": [{"question": q, "choices": c, "answer": a} for q, c, a in MC],
        "last_word.jsonl": [{"text": t} for t in LAST_WORD],
        "gen.jsonl": [{"prompt": p, "reference": r} for p, r in GEN],
        "docs.jsonl": [{"text": t} for t in DOCS],
    }
    for name, items in rows.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    for task, (data, body) in TASKS.items():
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / data}\n  cache_dir: {folder / 'hf-cache'}\n"
            f"test_split: test\n{body}"
        )
    return str(folder)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def model():
    return rwkvpy.load("demo")


@pytest.fixture(scope="module")
def cli_result(task_dir, tmp_path_factory):
    """``rwkvpy eval`` run for real on the three tasks: (its JSON on stdout, --output's)."""
    out = tmp_path_factory.mktemp("lm_eval_out") / "results.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvpy",
            "eval",
            "-m",
            "demo",
            *TASKS,
            "--include-path",
            task_dir,
            "--json",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), json.loads(out.read_text())


def reference(model, ctx: list, cont: list) -> tuple[float, bool]:
    """(log likelihood, greedy) of ``cont`` after ``ctx``: one forward over the whole text."""
    logits, _ = model.forward(ctx + cont, all_logits=True)
    rows = torch.log_softmax(logits[len(ctx) - 1 : -1].double(), dim=-1)
    t = torch.tensor(cont)
    return float(rows[torch.arange(len(cont)), t].sum()), bool((rows.argmax(-1) == t).all())


def text_reference(model, context: str, continuation: str):
    enc = model.tokenizer().encode
    return reference(model, enc(context) if context else [0], enc(continuation))


class Req:
    """What lm-eval hands a model: an object with ``args``."""

    def __init__(self, *args):
        self.args = args


# -- the model class -----------------------------------------------------------------------------
def test_loglikelihood_equals_the_whole_text_forward(model):
    lm = RwkvpyLM(model, batch_size=3, progress=False)
    greedy = generate(
        model, lm.tok, "Dictionaries map keys to", SamplingParams(greedy=True, max_tokens=6)
    ).text
    long = " and then some more text that runs past the stepping limit of the model class"
    assert len(lm.tok.encode(long)) > STEP_MAX_TOKENS
    pairs = [("Question: what is a list?\nAnswer:", c) for c in (" a sequence", " x", " ok!")]
    pairs += [
        ("Dictionaries map keys to", greedy),
        ("Dictionaries map keys to", " nothing"),
        ("Dictionaries map keys to", long),
        ("", "Hello"),
        ("One two", " three"),
    ]
    calls = {"forward": 0, "batch": []}
    forward, forward_batch = model.forward, model.forward_batch

    def counting_forward(*a, **k):
        calls["forward"] += 1
        return forward(*a, **k)

    def counting_batch(tokens, states=None, **k):
        calls["batch"].append(len(tokens))
        return forward_batch(tokens, states, **k)

    lm.model = type(
        "Counting",
        (),
        {
            "forward": staticmethod(counting_forward),
            "forward_batch": staticmethod(counting_batch),
            "prompt_chunk": model.prompt_chunk,
        },
    )()
    got = lm.loglikelihood([Req(c, x) for c, x in pairs])
    for (c, x), (ll, greedy_flag) in zip(pairs, got):
        want, want_greedy = text_reference(model, c, x)
        assert ll == pytest.approx(want, abs=1e-3), (c, x)
        assert greedy_flag == want_greedy, (c, x)
    assert got[3][1] is True and got[4][1] is False  # the greedy continuation, and one that is not
    # each distinct context once, plus the one long continuation in sequence mode
    assert calls["forward"] == 4 + 1
    assert calls["batch"] and max(calls["batch"]) <= 3


def test_rolling_is_one_pass_from_the_prefix_token(model):
    lm = RwkvpyLM(model, progress=False)
    texts = DOCS + ["Every object has an identity, a type and a value.", "\u00e9t\u00e9 \U0001f600"]
    got = lm.loglikelihood_rolling([Req(t) for t in texts] + [Req("")])
    for text, ll in zip(texts, got):
        want, _ = reference(model, [0], lm.tok.encode(text))
        assert ll == pytest.approx(want, rel=1e-5)
    assert got[-1] == 0.0
    newline = RwkvpyLM(model, prefix_token=10, progress=False)  # --prefix-token 10
    (ll,) = newline.loglikelihood_rolling([Req(texts[1])])
    assert ll == pytest.approx(reference(model, [10], lm.tok.encode(texts[1]))[0], rel=1e-5)
    assert len(lm.tok.encode(DOCS[0])) > 512  # more than one chunk: the state carried


def test_generate_until_is_rwkvpy_generate(model):
    """Batched generation (batch_size 2: ragged batches, sequences ending at different steps)
    gives rwkvpy.generate's text for each request alone."""
    lm = RwkvpyLM(model, batch_size=2, progress=False)
    reqs = [
        Req("The pass statement", {"until": ["\n"], "max_gen_toks": 40}),
        Req("Dictionaries map keys to", {"until": ".", "max_gen_toks": 5}),
        Req("A for loop iterates over the items of any", {"max_gen_toks": 64, "do_sample": False}),
        Req(
            "The import statement",
            {"until": ["\n\n"], "max_gen_toks": 30, "do_sample": True, "temperature": 0.8},
        ),
    ]
    got = lm.generate_until(reqs)
    tok = lm.tok
    for r, text in zip(reqs, got):
        kw = r.args[1]
        until = kw.get("until", [])
        params = (
            lm._params(kw)
            if kw.get("do_sample")
            # sampled: the same seed
            else SamplingParams(
                greedy=True,
                max_tokens=kw["max_gen_toks"],
                stop=[until] if isinstance(until, str) else until,
            )
        )
        assert text == generate(model, tok, r.args[0], params).text
        assert not any(u in text for u in ([until] if isinstance(until, str) else until))
    assert len(tok.encode(got[1])) <= 5
    # the prefix token is no stop token: a newline prefix leaves newlines in the text
    assert "\n" in got[2]
    assert RwkvpyLM(model, prefix_token=10, progress=False).generate_until(reqs) == got


def test_world_vocabulary(tmp_path):
    """A World-vocabulary model (random weights): lm-eval splits each pair as the context's
    tokens and the rest of the whole text's; the scores are the whole text's forward."""
    from rwkvpy.config import Version
    from rwkvpy.synth import save_random_model

    world = rwkvpy.load(
        save_random_model(
            tmp_path / "w.pth", version=Version.V7, n_embd=64, n_layer=1, vocab=65536, seed=1
        )
    )
    lm = RwkvpyLM(world, batch_size=2, progress=False)
    assert lm.tok.name == "world"
    enc = lm.tok.encode
    q = "Question: what is the capital of France?\nAnswer:"
    pairs = [(q, " Paris"), (q, " the city of light"), ("", "Hello world")]
    got = lm.loglikelihood([Req(c, x) for c, x in pairs])
    for (c, x), (ll, greedy) in zip(pairs, got):
        ctx = enc(c) if c else [0]
        cont = enc(c + x)[len(ctx) :] if c else enc(x)
        want, want_greedy = reference(world, ctx, cont)
        assert ll == pytest.approx(want, abs=1e-3) and greedy == want_greedy
    (ll,) = lm.loglikelihood_rolling([Req(DOCS[0])])
    assert ll == pytest.approx(reference(world, [0], enc(DOCS[0]))[0], rel=1e-5)


def test_bad_arguments_are_one_clear_error(model):
    from rwkvpy.errors import RwkvpyError

    for kw, msg in [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"prefix_token": 256}, "outside the vocabulary"),
        ({"temperature_x": 1}, "unknown argument"),
    ]:
        with pytest.raises(RwkvpyError, match=msg):
            RwkvpyLM(model, **kw)


# -- rwkvpy eval ---------------------------------------------------------------------------------
def test_eval_scores_equal_the_models_own(model, cli_result):
    result, written = cli_result
    assert written == result
    enc = model.tokenizer().encode
    res = result["results"]
    # multiple choice: the choice with the highest log likelihood (acc), per character
    acc = acc_norm = 0
    for q, choices, answer in MC:
        lls = [text_reference(model, f"Question: {q}\nAnswer:", " " + c)[0] for c in choices]
        acc += max(range(4), key=lambda i: lls[i]) == answer
        acc_norm += max(range(4), key=lambda i: lls[i] / len(choices[i])) == answer
    assert res["tiny_mc"]["acc,none"] == acc / len(MC)
    assert res["tiny_mc"]["acc_norm,none"] == acc_norm / len(MC)
    # the last word: greedy (acc) and perplexity = exp(-mean log likelihood)
    scored = [
        text_reference(model, *t.rsplit(" ", 1)[:1], " " + t.rsplit(" ", 1)[1]) for t in LAST_WORD
    ]
    assert res["tiny_last_word"]["acc,none"] == sum(g for _, g in scored) / len(LAST_WORD)
    assert res["tiny_last_word"]["perplexity,none"] == pytest.approx(
        math.exp(-sum(ll for ll, _ in scored) / len(LAST_WORD)), rel=1e-3
    )
    # generation: rwkvpy.generate's greedy text up to the first stop string, compared whole
    params = SamplingParams(greedy=True, max_tokens=24, stop=[".", ":", "\n"])
    texts = [generate(model, model.tokenizer(), p, params).text for p, _ in GEN]
    assert res["tiny_gen"]["exact_match,none"] == pytest.approx(
        sum(t == r for t, (_, r) in zip(texts, GEN)) / len(GEN)
    )
    # the rolling task: every token of each document after token 0
    nll = sum(-reference(model, [0], enc(t))[0] for t in DOCS)
    words = sum(len(t.split()) for t in DOCS)
    n_bytes = sum(len(t.encode()) for t in DOCS)
    roll = res["tiny_rolling"]
    assert roll["word_perplexity,none"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert roll["byte_perplexity,none"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert roll["bits_per_byte,none"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert result["n-samples"]["tiny_mc"]["effective"] == len(MC)


def test_rolling_equals_rwkvpy_perplexity(cli_result, tmp_path, capsys):
    """The rolling task's per-word and per-byte perplexity from ``rwkvpy perplexity`` (its
    command-line code, run in this process) on the same document with token 0 (NUL in the byte
    vocabulary) in front."""
    from rwkvpy.cli import main

    (doc,) = DOCS
    f = tmp_path / "doc.txt"
    f.write_bytes(b"\0" + doc.encode())
    capsys.readouterr()
    assert main(["perplexity", "-m", "demo", str(f), "--json"]) == 0
    nll = json.loads(capsys.readouterr().out)["nll_sum"]
    roll = cli_result[0]["results"]["tiny_rolling"]
    assert roll["word_perplexity,none"] == pytest.approx(math.exp(nll / len(doc.split())), rel=1e-6)
    assert roll["byte_perplexity,none"] == pytest.approx(
        math.exp(nll / len(doc.encode())), rel=1e-6
    )


def test_eval_prints_the_table_and_quiet_is_quiet(task_dir, capsys):
    """The table on stdout, nothing on stderr; the task given as its YAML file."""
    from rwkvpy.cli import main

    capsys.readouterr()
    assert main(["eval", "-m", "demo", f"{task_dir}/tiny_mc.yaml", "--limit", "2", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    rows = [r for r in out.splitlines() if r.startswith("|tiny_mc")]
    assert len(rows) == 1 and "|acc " in rows[0] and "n-shot" in out
    assert "|acc_norm|" in out.replace(" ", "")


def test_eval_errors_are_one_line(task_dir, monkeypatch, capsys):
    from rwkvpy.cli import main

    assert main(["eval", "-m", "demo", "tiny_mc", "--include-path", task_dir + "/nope"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"rwkvpy: error: --include-path {task_dir}/nope: no such folder"
    )
    assert main(["eval", "tiny_mc", "--include-path", task_dir]) == 1
    assert "no model given" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert main(["eval", "-m", "demo", "tiny_mc"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'rwkvpy[eval]'" in err[0]


def test_unknown_task_names_the_nearest(task_dir, monkeypatch, capsys):
    """An unknown name is looked up in lm-eval's whole index; here an index of the test's
    folder alone stands in for it (lm-eval's ~14,000 tasks take several seconds to index)."""
    import lm_eval.tasks

    from rwkvpy.cli import main

    class FolderOnly(lm_eval.tasks.TaskManager):
        def __init__(self, include_path=None, **kw):
            super().__init__(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FolderOnly)
    assert main(["eval", "-m", "demo", "tiny_mcq", "--include-path", task_dir]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rwkvpy: error: unknown task 'tiny_mcq'")
    assert "did you mean tiny_mc" in err[-1]
    assert len(err) == 2 and "indexing lm-eval's tasks" in err[0]  # the notice, then the error


# -- the same tasks through the server -------------------------------------------------------------
def test_server_with_lm_evals_local_completions_gives_the_same_scores(
    cli_result, task_dir, tmp_path
):
    """lm-eval's own ``local-completions`` model against the real server (echo and logprobs,
    lm-eval's remote tokenizer through /tokenizer_info, /tokenize and /detokenize): the same
    accuracies, and log likelihoods within float32 rounding of the in-process ones (the server
    scores each prompt in one sequence-mode pass, the in-process model steps continuations)."""
    import httpx
    from lm_eval.api.registry import get_model
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager
    from servers import serving

    with serving([], tmp_path / "server.log", model="demo", clean=False) as server:
        name = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        client = get_model("local-completions")(
            model=name,
            base_url=server.url + "/v1/completions",
            tokenizer_backend="remote",
            custom_prefix_token_id=0,
            max_length=100000,
        )
        # lm-eval's evaluation itself (simple_evaluate adds only its environment report)
        tasks = TaskManager(include_path=task_dir, include_defaults=False).load(list(TASKS))
        out = evaluate(client, tasks, log_samples=False, bootstrap_iters=0)
    local, remote = cli_result[0]["results"], out["results"]
    for task in TASKS:
        # the rolling task is one sequence-mode pass both ways; the last word's perplexity is
        # exp(-mean log likelihood): rel 1e-3 is 1e-3 nats per word
        rel = 1e-5 if task == "tiny_rolling" else 1e-3
        for key, value in local[task].items():
            if key.endswith("_stderr,none") or not isinstance(value, float):
                continue
            exact = key.split(",")[0] in ("acc", "acc_norm", "exact_match")
            assert remote[task][key] == (value if exact else pytest.approx(value, rel=rel)), (
                task,
                key,
            )
