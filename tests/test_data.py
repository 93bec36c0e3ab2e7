"""Data shapes, prompt masking and the built-in dataset."""

import json
import re

import pytest

from qsvd.data import IGNORE_INDEX, build_dataset, synthetic_arithmetic
from conftest import char_tokenizer

ROWS = {
    "alpaca": {"instruction": "Pick one.", "input": "a or b", "output": "a", "answer": "answer1"},
    "qa": {"question": "What is 2+3?", "answer": "2+3=5\n#### 5"},
    "chat": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
}
COMPLETIONS = {"alpaca": "a", "qa": "2+3=5\n#### 5", "chat": "Hello!"}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_only_the_completion_carries_loss(fmt, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[fmt]) + "\n")
    tokenizer = char_tokenizer()
    row = build_dataset(str(path), tokenizer, seq_len=200)[0]
    labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == COMPLETIONS[fmt] + "</s>"
    assert row["input_ids"][-len(labelled):] == labelled
    prompt = tokenizer.decode(row["input_ids"][:-len(labelled)])
    assert prompt.startswith("<s>### Instruction:") and prompt.endswith("### Response:\n")


def test_chat_template_renders_prompt_and_masks_it(tmp_path):
    tokenizer = char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ROWS["qa"]]))
    row = build_dataset(str(path), tokenizer, seq_len=200)[0]
    labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "2+3=5\n#### 5</s>"
    assert tokenizer.decode(row["input_ids"]).startswith("<user>What is 2+3?</s><assistant>")


def test_rows_longer_than_seq_len_are_dropped(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": "q" * n, "answer": "a"}) + "\n" for n in (10, 100)))
    assert len(build_dataset(str(path), char_tokenizer(), seq_len=60)) == 1


def test_builtin_arithmetic_answers_check_out():
    rows = synthetic_arithmetic(rows=50, seed=3)
    assert len(rows) == 50 and rows[0] == synthetic_arithmetic(rows=50, seed=3)[0]
    for row in rows:
        start, more, given = map(int, re.findall(r"\d+", row["question"]))
        assert row["answer"].endswith(f"#### {start + more - given}")
        assert start + more - given >= 0
