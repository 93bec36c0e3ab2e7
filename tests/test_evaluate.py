"""`qsvd eval`: answer extraction, the four tasks against direct computations, the CLI and
`finetune --eval-data`."""

import json
import math

import datasets
import pytest
import torch
from click.testing import CliRunner

from conftest import char_tokenizer, tiny_model
from qsvd.cli import cli
from qsvd.data import IGNORE_INDEX, tokenize
from qsvd.evaluate import (Example, bootstrap_interval, choose_answers, evaluate_model, examples_from, extract_number, extract_option,
                           generate_answers, option_log_likelihoods, option_sequences, wilson_interval)

ARC_ROW = {"instruction": "Please choose the correct answer to the question: Which is a gas?\n\n"
                          "Answer1: ice Answer2: steam Answer3: rock\n\nAnswer format: answer1/answer2/answer3",
           "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
BOOLQ_ROW = {"instruction": "Please answer the following question with true or false, question: is ice cold?"
                            "\n\nAnswer format: true/false",
             "input": "", "output": "the correct answer is true", "answer": "true"}
GSM_ROW = {"question": "Tom has 1,000 apples and buys 234 more. How many now?",
           "answer": "1000 + 234 = <<1000+234=1234>>1,234\n#### 1,234"}


@pytest.mark.parametrize("text, number", [
    ("so she has 1000 + 234 = 1,234 apples.\n#### 1,234", "1234"),
    ("#### 72\nIn May she sold 5 more", "72"),          # the number after the marker, not the last
    ("She earned $10.00 in 50 minutes, so 12 an hour", "12"),  # no marker: the last number
    ("The answer is -3.50.", "-3.5"),
    ("7.0", "7"),
    ("#### \nthe total is 18", "18"),                   # an empty marker falls back to the last number
    ("no digits here", None),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


@pytest.mark.parametrize("text, options, option", [
    ("the correct answer is answer3", ["answer1", "answer2", "answer3"], "answer3"),
    ("Answer2, not answer1", ["answer1", "answer2"], "answer2"),           # the first named, any case
    ("answer10 is right", ["answer1", "answer2"], None),                   # whole words only
    ("True. The ice is cold", ["true", "false"], "true"),
    ("the correct answer is false", ["true", "false"], "false"),
    ("I am not sure", ["true", "false"], None),
])
def test_extract_option(text, options, option):
    assert extract_option(text, options) == option


def test_references_and_options_of_each_format():
    arc, boolq = examples_from(datasets.Dataset.from_list([ARC_ROW, BOOLQ_ROW]), "test")
    assert (arc.gold, arc.options) == ("answer2", ["answer1", "answer2", "answer3"])
    assert (boolq.gold, boolq.options) == ("true", ["true", "false"])
    [gsm] = examples_from(datasets.Dataset.from_list([GSM_ROW]), "test")
    assert (gsm.gold, gsm.options) == ("1234", None)


def test_wilson_interval():
    low, high = wilson_interval(8, 16)
    assert low == pytest.approx(0.27999, abs=1e-5) and high == pytest.approx(0.72001, abs=1e-5)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.8416 / 13.8416))  # z² / (n + z²)
    assert wilson_interval(10, 10) == (pytest.approx(10 / 13.8416), 1.0)


def full_log_likelihood(model, sequence) -> float:
    """Σ log p of a sequence's supervised tokens, from one plain forward pass."""
    ids = torch.tensor([sequence["input_ids"]])
    log_probs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    return sum(log_probs[t - 1, token].item() for t, token in enumerate(sequence["input_ids"])
               if sequence["labels"][t] != IGNORE_INDEX)


def test_choice_scores_rank_options_by_their_full_log_likelihood():
    model, tokenizer = tiny_model(), char_tokenizer()
    rows = [ARC_ROW, {**ARC_ROW, "instruction": "A much longer question, to pad the batch: " + ARC_ROW["instruction"]},
            {**ARC_ROW, "answer": "answer3", "output": "the correct answer is answer3"}]
    examples = examples_from(datasets.Dataset.from_list(rows), "test")
    sequences = [option_sequences(example, tokenizer) for example in examples]
    assert tokenizer.decode(sequences[0][2]["input_ids"]).endswith("the correct answer is answer3</s>")
    with torch.no_grad():
        batched = option_log_likelihoods(model, sequences)  # prompts of different lengths, left-padded
        for row, options in zip(batched, sequences):
            full = torch.tensor([full_log_likelihood(model, sequence) for sequence in options])
            # the shared prefix adds the same to every option: differences are those of the full sums
            assert torch.allclose(row - row[0], full - full[0], atol=1e-4)
            assert row.argmax() == full.argmax()
    results = choose_answers(model, tokenizer, examples, batch_size=2)
    for result, row in zip(results, batched):
        assert result["prediction"] == ["answer1", "answer2", "answer3"][row.argmax()]


def test_perplexity_matches_a_hand_computation(tmp_path):
    model, tokenizer = tiny_model(), char_tokenizer()
    texts = ["The cat sat on the mat.", "Plain text, to measure what the model still knows."]
    result = evaluate_model(model, tokenizer, datasets.Dataset.from_list([{"text": t} for t in texts]), "ppl",
                            tmp_path / "ppl.jsonl", seq_len=16, batch_size=3)
    stream = [token for text in texts for token in tokenizer(text, add_special_tokens=False)["input_ids"] + [3]]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), 16):
            window = stream[start:start + 16]
            log_probs = torch.log_softmax(model(torch.tensor([window])).logits[0], dim=-1)
            nll -= sum(log_probs[t, window[t + 1]].item() for t in range(len(window) - 1))
            count += len(window) - 1
    assert result.tokens == count and result.examples == math.ceil(len(stream) / 16)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "ppl.jsonl").read_text().splitlines()]
    assert sum(line["tokens"] for line in lines) == count


def test_answer_nll_is_the_mean_over_reference_tokens_with_a_bootstrap_interval(tmp_path):
    model, tokenizer = tiny_model(), char_tokenizer()
    rows = [ARC_ROW, BOOLQ_ROW, {**ARC_ROW, "instruction": "A longer question, to pad the batch: " + ARC_ROW["instruction"]},
            GSM_ROW]
    result = evaluate_model(model, tokenizer, datasets.Dataset.from_list(rows), "nll", tmp_path / "nll.jsonl",
                            batch_size=3)
    sequences = [tokenize(example.messages, tokenizer) for example in examples_from(datasets.Dataset.from_list(rows), "t")]
    with torch.no_grad():
        nll = [-full_log_likelihood(model, sequence) for sequence in sequences]
    counts = [sum(label != IGNORE_INDEX for label in sequence["labels"][1:]) for sequence in sequences]
    assert counts[0] == len(tokenizer("the correct answer is answer2</s>", add_special_tokens=False)["input_ids"])
    lines = [json.loads(line) for line in (tmp_path / "nll.jsonl").read_text().splitlines()]
    assert [line["tokens"] for line in lines] == counts and result.tokens == sum(counts)
    assert [line["nll"] for line in lines] == pytest.approx(nll, rel=1e-5)
    assert result.nll == pytest.approx(sum(nll) / sum(counts), rel=1e-5)
    low, high = result.nll_ci95
    assert low < result.nll < high and result.summary()["ci95"] == (low, high)
    assert result.accuracy is None and "answer NLL" in result.line()


def test_bootstrap_interval_of_a_mean_per_token():
    assert bootstrap_interval([6.0] * 5, [3] * 5) == (2.0, 2.0)  # every resample has the same mean
    rng = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, 30, (400,), generator=rng)
    nll = tokens * (2.0 + torch.randn(400, generator=rng))  # rows of mean 2 and sd 1 a token-row
    low, high = bootstrap_interval(nll.tolist(), tokens.tolist())
    mean = (nll.sum() / tokens.sum()).item()
    assert low < mean < high and 0.05 < high - low < 0.4  # ≈ 2 · 1.96 · σ / √n
    assert bootstrap_interval(nll.tolist(), tokens.tolist()) == (low, high)  # seeded
    low_few, high_few = bootstrap_interval(nll[:40].tolist(), tokens[:40].tolist())
    assert high_few - low_few > 2 * (high - low)  # 10× fewer rows: about √10 as wide


def test_batched_generation_equals_one_prompt_at_a_time():
    model, tokenizer = tiny_model(seed=3), char_tokenizer()  # a seed whose text depends on the prompt
    examples = [Example([{"role": "user", "content": q}, {"role": "assistant", "content": "#### 7"}], "7", None)
                for q in ["What is 3 + 4?", "A much longer question, so that the batch needs padding: 3 + 4?"]]
    batched = generate_answers(model, tokenizer, examples, batch_size=2, max_new_tokens=12)
    assert batched[0]["output"] != batched[1]["output"]
    for example, result in zip(examples, batched):
        [alone] = generate_answers(model, tokenizer, [example], batch_size=1, max_new_tokens=12)
        assert result["output"] == alone["output"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_eval_cli_on_a_plain_model_writes_predictions(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "arc.jsonl", [ARC_ROW, BOOLQ_ROW, ARC_ROW])
    predictions = tmp_path / "out" / "predictions.jsonl"
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", str(data), "--bits", "4",
                                      "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output
    assert "95% CI" in result.output
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [line["gold"] for line in lines] == ["answer2", "true", "answer2"]
    assert all(line["correct"] == (line["prediction"] == line["gold"]) for line in lines)
    correct = sum(line["correct"] for line in lines)
    assert f"({correct}/3)" in result.output


@pytest.mark.parametrize("rows, args, message", [
    ([GSM_ROW], ["--task", "choice"], "--task choice needs answer options"),
    ([GSM_ROW], ["--task", "ppl"], "--task ppl needs a 'text' field"),
    ([{"text": "plain"}], ["--task", "gen"], "holds plain text: it takes --task ppl"),
    ([{"text": "plain"}], ["--task", "nll"], "holds plain text: it takes --task ppl, not nll"),
    ([{"prompt": "x"}], [], "its fields are: prompt"),
    ([GSM_ROW], ["--batch-size", "0"], "--batch-size must be positive"),
])
def test_eval_bad_input_is_one_line(rows, args, message, tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "data.jsonl", rows)
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", str(data), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not list(tmp_path.glob("eval-*"))


def test_eval_of_a_missing_file_or_model(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", str(tmp_path / "none.json")])
    assert result.exit_code == 2 and "--data" in result.output and "no such file" in result.output
    data = write_rows(tmp_path / "data.jsonl", [GSM_ROW])
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "nowhere"), "--data", str(data)])
    assert result.exit_code == 2 and "no such file or directory" in result.output


def test_eval_cli_answer_nll_of_a_plain_model(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "arc.jsonl", [ARC_ROW, BOOLQ_ROW, GSM_ROW])
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", str(data), "--task", "nll",
                                      "--predictions", str(tmp_path / "nll.jsonl")])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tmp_path / "nll.jsonl").read_text().splitlines()]
    mean = sum(line["nll"] for line in lines) / sum(line["tokens"] for line in lines)
    assert f"answer NLL {mean:.4f} per token, 95% CI" in result.output and "in 3 rows" in result.output


def test_finetune_eval_data_records_scores_in_the_run(tiny_model_dir, tmp_path):
    choice = write_rows(tmp_path / "dev.jsonl", [ARC_ROW, BOOLQ_ROW])
    text = tmp_path / "general.txt"
    text.write_text("Some general text for perplexity.")
    output = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--output", str(output),
                                      "--method", "loraxs", "--rank", "4", "--max-steps", "2", "--seq-len", "400",
                                      "--eval-data", str(choice), "--eval-data", str(text)])
    assert result.exit_code == 0, result.output
    record = json.loads((output / "qsvd_config.json").read_text())
    result = CliRunner().invoke(cli, ["eval", str(output), "--data", str(choice), "--task", "nll"])
    assert result.exit_code == 0 and (output / "eval-dev-nll.jsonl").is_file(), result.output
    assert record["eval"]["dev"]["task"] == "choice" and record["eval"]["dev"]["examples"] == 2
    assert record["eval"]["general"]["task"] == "ppl" and record["eval"]["general"]["perplexity"] > 1
    assert len((output / "eval-dev-choice.jsonl").read_text().splitlines()) == 2
    assert (output / record["eval"]["general"]["predictions"]).is_file()


def test_eval_of_a_run_keeps_its_bits_and_writes_into_the_run(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--output", str(output),
                                      "--method", "edora", "--rank", "4", "--max-steps", "1", "--seq-len", "400"])
    assert result.exit_code == 0, result.output
    data = write_rows(tmp_path / "gsm.jsonl", [GSM_ROW, GSM_ROW])
    result = CliRunner().invoke(cli, ["eval", str(output), "--data", str(data), "--bits", "4"])
    assert result.exit_code == 2 and "is a trained run" in result.output
    result = CliRunner().invoke(cli, ["eval", str(output), "--data", str(data), "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    lines = (output / "eval-gsm-gen.jsonl").read_text().splitlines()
    assert [json.loads(line)["gold"] for line in lines] == ["1234", "1234"]


def test_finetune_checks_eval_data_before_training(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "gsm.jsonl", [GSM_ROW])
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--output", str(tmp_path / "run"),
                                      "--eval-data", str(data), "--eval-task", "ppl"])
    assert result.exit_code == 2 and "--task ppl needs a 'text' field" in result.output
    assert not (tmp_path / "run").exists()


def test_choice_sequences_replace_the_answer_in_the_reference():
    tokenizer = char_tokenizer()
    [example] = examples_from(datasets.Dataset.from_list([BOOLQ_ROW]), "test")
    texts = [tokenizer.decode(s["input_ids"], skip_special_tokens=True) for s in option_sequences(example, tokenizer)]
    assert texts[0].endswith("the correct answer is true") and texts[1].endswith("the correct answer is false")
    assert tokenize(example.messages, tokenizer)["input_ids"] == option_sequences(example, tokenizer)[0]["input_ids"]
