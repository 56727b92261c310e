"""Write two lm-evaluation-harness tasks over the demo model's held-out text into a folder, for
``rwkvpy eval --include-path FOLDER`` (docs/scoring.md, the worked example):

- ``demo_chat_mc``: for each held-out chat subject of :func:`rwkvpy.demo.chat_pairs` (54 on
  Python 3.11.7: none of them in the demo's training), its first question in the chat format
  (``User: ...`` then ``Assistant:``) and four answers to choose from: its own and the answers of
  the next three held-out subjects;
- ``demo_heldout_doc``: the held-out documentation (:func:`rwkvpy.demo.held_out_text`) as
  documents for a rolling log likelihood, one per blank-line separated block.

Usage: python tools/demo_eval_tasks.py FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rwkvpy.chat import STOP, render_user
from rwkvpy.demo import chat_pairs, held_out_text

MC_YAML = """\
task: demo_chat_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""

DOC_YAML = """\
task: demo_heldout_doc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
"""


def mc_rows() -> list:
    held = [(qs[0], answer) for _s, qs, answer, out in chat_pairs() if out]
    rows = []
    for i, (question, answer) in enumerate(held):
        others = [held[(i + k) % len(held)][1] for k in (1, 2, 3)]
        correct = i % 4  # the right answer's place rotates
        choices = others[:correct] + [answer] + others[correct:]
        rows.append(
            {"prompt": render_user(question).rstrip(), "choices": choices, "answer": correct}
        )
    return rows


def doc_rows() -> list:
    blocks = [b.strip("\n") for b in held_out_text().split(STOP)]
    return [{"text": b} for b in blocks if b.strip()]


def write(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows, yaml in (
        ("demo_chat_mc", mc_rows(), MC_YAML),
        ("demo_heldout_doc", doc_rows(), DOC_YAML),
    ):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(
            yaml.format(data=json.dumps(str(data.resolve()))), encoding="utf-8"
        )
        print(f"{folder / name}.yaml: {len(rows)} documents")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    write(Path(sys.argv[1]))
