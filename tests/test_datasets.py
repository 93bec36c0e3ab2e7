"""Any dataset a user names (files, save_to_disk directories, the hub through the datasets cache),
in six row shapes; rows skipped only with a count; malformed rows told by number; loggers."""

import importlib.util
import json
import os
import shutil

import datasets
import huggingface_hub
import pytest
from click.testing import CliRunner

from qsvd.cli import cli
from qsvd.data import IGNORE_INDEX, tokenize_rows, training_rows
from qsvd.errors import QSVDError

from conftest import char_tokenizer

QA = [{"question": f"What is {a} + {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"} for a in range(1, 7)]


def write_forms(rows: list[dict], where) -> dict[str, str]:
    """The same rows as every local form --data takes."""
    dataset = datasets.Dataset.from_list(rows)
    forms = {"json": where / "rows.json", "jsonl": where / "rows.jsonl", "csv": where / "rows.csv",
             "parquet": where / "rows.parquet", "saved": where / "saved", "saved splits": where / "splits"}
    forms["json"].write_text(json.dumps(rows))
    forms["jsonl"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset.to_csv(forms["csv"], index=False)
    dataset.to_parquet(forms["parquet"])
    dataset.save_to_disk(forms["saved"])
    datasets.DatasetDict({"train": dataset, "test": dataset.select([0])}).save_to_disk(forms["saved splits"])
    return {name: str(path) for name, path in forms.items()}


@pytest.fixture
def offline_datasets_cache(tmp_path, monkeypatch):
    """A datasets cache holding the hub dataset tiny-org/tiny-qa, as `load_dataset` leaves it after
    one online load: prepared by datasets' own json builder under the hub name and its default config."""
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "datasets-cache"
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in QA))
    builder = Json(cache_dir=str(cache), dataset_name="tiny-qa", data_files={"train": str(source)}, hash="0" * 16)
    builder.download_and_prepare()
    prepared = next((cache / "tiny-qa").iterdir())
    (cache / "tiny-org___tiny-qa").mkdir()
    shutil.move(prepared, cache / "tiny-org___tiny-qa" / "default")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def tokenized(data: str, seq_len: int = 400, **options):
    return tokenize_rows(training_rows(data, **{k: v for k, v in options.items() if k != "truncate"}),
                         char_tokenizer(), seq_len, options.get("truncate", False))


def test_every_local_form_and_the_hub_give_the_same_rows(tmp_path, offline_datasets_cache):
    forms = write_forms(QA, tmp_path)
    expected = tokenized(forms["jsonl"]).rows.to_list()
    for name, data in forms.items():
        assert tokenized(data).rows.to_list() == expected, name
    assert tokenized("tiny-org/tiny-qa", split="train").rows.to_list() == expected
    assert tokenized(str(tmp_path / "splits"), split="test").read == 1
    with pytest.raises(QSVDError, match=r"has no split 'dev'; its splits: train, test \(--data-split\)"):
        training_rows(str(tmp_path / "splits"), split="dev")
    for data in (forms["csv"], forms["saved"]):  # one split each: a flag picking one is told, not ignored
        with pytest.raises(QSVDError, match=f"--data-split picks part of a hub dataset or of a saved DatasetDict; "
                                            f"--data {data} has one split"):
            training_rows(data, split="train")
    with pytest.raises(QSVDError, match="--data-config picks part of a hub dataset"):
        training_rows(forms["saved splits"], config="main")
    with pytest.raises(QSVDError, match=r"tiny-org/absent is not in the datasets cache and the hub cannot be reached"):
        training_rows("tiny-org/absent")


SHAPES = {  # row → what carries loss
    "alpaca": ({"instruction": "Pick one.", "input": "a or b", "output": "a"}, "a</s>"),
    "qa": ({"question": "What is 2+3?", "answer": "#### 5"}, "#### 5</s>"),
    "messages": ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"}]}, "Hello!</s>"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}, "Hey</s>"),
    "text": ({"text": "Every token counts."}, "<s>Every token counts.</s>"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_row_shape_puts_the_loss_on_its_answer(shape, tmp_path):
    row, carries_loss = SHAPES[shape]
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    tokens = tokenized(str(tmp_path / "rows.jsonl")).rows[0]
    labelled = [token for token in tokens["labels"] if token != IGNORE_INDEX]
    assert char_tokenizer().decode(labelled) == carries_loss
    assert tokens["input_ids"][-len(labelled):] == labelled


def test_own_fields_and_max_rows(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt_text,reply,other\n" + "".join(f"say {n},{n},x\n" for n in range(5)))
    result = tokenized(str(tmp_path / "rows.csv"), prompt_field="prompt_text", response_field="reply", max_rows=3)
    assert result.read == 3 and len(result.rows) == 3
    assert char_tokenizer().decode([t for t in result.rows[2]["labels"] if t != IGNORE_INDEX]) == "2</s>"
    with pytest.raises(QSVDError, match="has no answer field"):
        training_rows(str(tmp_path / "rows.csv"), prompt_field="prompt_text", response_field="answer")


def test_rows_skipped_are_counted_and_truncate_cuts_only_responses(tmp_path):
    rows = [{"question": "short?", "answer": "yes"}, {"question": "long?", "answer": "y" * 300},
            {"question": "q" * 300, "answer": "no"}, {"question": "blank?", "answer": ""}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    skipped = tokenized(str(tmp_path / "rows.jsonl"), seq_len=100)
    assert (len(skipped.rows), skipped.read) == (1, 4)
    assert skipped.skipped == {"longer than --seq-len 100": 2, "with an empty response": 1}
    assert skipped.line() == "1 of 4 rows kept, 3 skipped (2 longer than --seq-len 100; 1 with an empty response)"
    cut = tokenized(str(tmp_path / "rows.jsonl"), seq_len=100, truncate=True)
    assert len(cut.rows) == 2 and cut.skipped == {"longer than --seq-len 100": 1, "with an empty response": 1}
    long_answer = cut.rows[1]
    assert len(long_answer["input_ids"]) == 100
    prompt = [t for t, label in zip(long_answer["input_ids"], long_answer["labels"]) if label == IGNORE_INDEX]
    assert char_tokenizer().decode(prompt).endswith("long?\n\n### Response:\n")  # the prompt is whole


MALFORMED = [
    ({"messages": "hello"}, "row 2: messages is not a non-empty list of turns"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "row 2: the last turn of messages is the user's"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "row 2: turn 1 of messages has no 'role'"),
    ({"conversations": [{"from": "robot", "value": "Hi"}, {"from": "gpt", "value": "a"}]},
     "row 2: turn 1 of conversations is from 'robot'"),
    ({"conversations": []}, "row 2: conversations is not a non-empty list of turns"),
    ({"instruction": {"nested": 1}, "output": "a"}, "row 2: instruction is a dict, not text"),
    ({"text": ["a", "list"]}, "row 2: text is a list, not text"),
]


@pytest.mark.parametrize("row,message", MALFORMED)
def test_a_malformed_row_is_told_by_number_and_nothing_is_written(row, message, tiny_model_dir, tmp_path):
    good = {key: SHAPES[shape][0][key] for shape in SHAPES for key in row if key in SHAPES[shape][0]}
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--data", str(data),
                                      "--output", str(tmp_path / "run"), "--max-steps", "1"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: --data {data} ") and message in last and "fix or remove the row" in last
    assert sorted(os.listdir(tmp_path)) == ["rows.jsonl"]


def test_counts_loss_plot_and_tensorboard_are_kept_with_the_run(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = QA + [{"question": "q" * 500, "answer": "a"}, {"question": "blank", "answer": None}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--data", str(tmp_path / "rows.jsonl"),
                                      "--rank", "4", "--max-steps", "3", "--batch-size", "2", "--seq-len", "400",
                                      "--report-to", "tensorboard", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "6 of 8 rows kept, 2 skipped (1 longer than --seq-len 400; 1 with an empty response)" in result.output
    run = tmp_path / "run"
    record = json.loads((run / "qsvd_config.json").read_text())
    assert record["data"] == {"rows": 8, "kept": 6, "skipped": {"longer than --seq-len 400": 1, "with an empty response": 1}}
    assert (run / "loss.png").read_bytes().startswith(b"\x89PNG")
    (events,) = (run / "logs").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    logged = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses == pytest.approx(logged, rel=1e-6) and len(losses) == 3


@pytest.mark.parametrize("report_to,message", [("neptune", "--report-to 'neptune' is not one of: none, tensorboard"),
                                               ("wandb", "--report-to wandb needs its package: pip install wandb")])
def test_report_to_is_checked_before_any_work(report_to, message, tmp_path):
    if report_to == "wandb" and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    result = CliRunner().invoke(cli, ["finetune", "--report-to", report_to, "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "run").exists()


BROKEN_FILES = {
    "rows.jsonl": ('{"question": "a", "answer": "b"}\n{"question": broken\n', "JSON parse error"),
    "rows.csv": ('question,answer\n"a,b\n', "is not a csv file of records: Error tokenizing data"),
    "empty.jsonl": ("", "is empty"),
    "rows.parquet": ("PAR1 garbage", "is not a parquet file of records: Parquet magic bytes not found"),
    "rows.xlsx": ("anything", "qsvd reads json, jsonl, csv and parquet files"),
}


@pytest.mark.parametrize("name", list(BROKEN_FILES))
def test_a_broken_data_file_is_one_line(name, tmp_path):
    content, message = BROKEN_FILES[name]
    (tmp_path / name).write_text(content)
    result = CliRunner().invoke(cli, ["finetune", "--data", str(tmp_path / name), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output.strip().splitlines()[-1], result.output
    assert sorted(os.listdir(tmp_path)) == [name]


def test_eval_data_takes_the_same_forms(tiny_model_dir, tmp_path, offline_datasets_cache):
    import qsvd
    from qsvd.data import eval_sets

    forms = write_forms(QA, tmp_path)
    for data, split, examples in [("tiny-org/tiny-qa", "train", len(QA)), (forms["saved splits"], None, 1),
                                  (forms["parquet"], None, len(QA))]:  # eval's default split is test
        result = qsvd.evaluate(tiny_model_dir, data, data_split=split, max_new_tokens=2,
                               predictions=tmp_path / "predictions.jsonl")
        assert result.summary()["examples"] == examples
    (path, rows, task), = eval_sets([forms["saved splits"]], None, split="test")
    assert (len(rows), task) == (1, "gen")
