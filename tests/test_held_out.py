"""A held-out loss while training: --eval-steps scores it into the log, --early-stopping stops on it,
--keep-best publishes the best adapter, and a resumed run keeps its patience and its best."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import qsvd
from qsvd import train
from qsvd.batching import batch_collator, choose
from qsvd.cli import cli
from qsvd.data import held_out_rows, read_eval_rows, synthetic_arithmetic
from qsvd.loss import supervised_loss
from qsvd.split import adapter_state
from conftest import char_tokenizer, killed_after_step, tiny_run_args


@pytest.fixture
def held(tmp_path):
    """Word problems like the built-in training rows, and a text file."""
    path = tmp_path / "held.jsonl"
    synthetic_arithmetic(rows=8, seed=99).to_json(path)
    (tmp_path / "prose.txt").write_text("Ava has 12 apples and gives away 5, so she has 7 left. " * 12)
    return path


def options(model_dir, output, held, **more):
    return dict(model=str(model_dir), output=str(output), method="edora", bits=4, rank=4, seq_len=400, batch_size=4,
                lr=3e-2, warmup_ratio=0.0, save_steps=2, eval_data=[str(held)], eval_steps=2, eval_rows=8) | more


def log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_eval_steps_scores_each_file_s_held_out_loss_into_the_log(tiny_model_dir, held, tmp_path):
    """Every 2 steps, each file's loss: the answers' NLL a token of the word problems (it falls as
    the model learns them; at the last step it is the trained model's own loss on those rows,
    batch by batch), and the text's."""
    run = tmp_path / "run"
    trained = qsvd.finetune(**options(tiny_model_dir, run, held, max_steps=4,
                                      eval_data=[str(held), str(held.with_name("prose.txt"))])).model
    scores = {entry["step"]: entry for entry in log(run) if "eval_held_loss" in entry}
    texts = {entry["step"]: entry["eval_prose_loss"] for entry in log(run) if "eval_prose_loss" in entry}
    assert sorted(scores) == sorted(texts) == [2, 4] and all(0 < value < 10 for value in texts.values())
    assert scores[4]["eval_held_loss"] < scores[2]["eval_held_loss"]
    rows = held_out_rows(read_eval_rows(held), "held", char_tokenizer(), 400, 8)
    collate = batch_collator(char_tokenizer(), choose("auto", torch.device("cpu"), torch.float32, "sdpa"))
    with torch.no_grad():
        expected = [supervised_loss(trained, collate([rows[i] for i in range(start, start + 4)])).item()
                    for start in (0, 4)]
    assert scores[4]["eval_held_loss"] == pytest.approx(sum(expected) / 2, rel=1e-4)
    assert (run / "loss.png").stat().st_size > 0


def scripted_losses(monkeypatch, by_step: dict[int, float]) -> None:
    """Each evaluation's held-out loss, by step, instead of a real one (as Trainer's evaluate ends)."""
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = {"eval_held_loss": by_step[self.state.global_step]}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    monkeypatch.setattr(train.SupervisedTokensTrainer, "evaluate", evaluate)


def adapters_by_step(monkeypatch) -> dict[int, dict]:
    seen = {}
    on_step_end = train.StepClock.on_step_end

    def kept(self, args, state, control, model=None, **kwargs):
        seen[state.global_step] = {name: t.detach().clone() for name, t in adapter_state(model).items()}
        return on_step_end(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(train.StepClock, "on_step_end", kept)
    return seen


LOSSES = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.6, 10: 2.7, 12: 2.8}  # best at 4; two evaluations without a lower at 8


def test_early_stopping_and_keep_best_and_a_resume_keeps_both(tiny_model_dir, held, tmp_path, monkeypatch):
    scripted_losses(monkeypatch, LOSSES)
    seen = adapters_by_step(monkeypatch)
    run_options = options(tiny_model_dir, tmp_path / "run", held, max_steps=12, early_stopping=2, keep_best=True)
    qsvd.finetune(**run_options)
    record = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())
    assert max(entry["step"] for entry in log(tmp_path / "run")) == 8  # stopped: patience 2 after step 4
    assert record["best"] == {"step": 4, "metric": "eval_held_loss", "value": 2.0}
    published = load_file(tmp_path / "run" / "adapter.safetensors")
    assert all(torch.equal(published[name], tensor) for name, tensor in seen[4].items())
    assert not all(torch.equal(published[name], tensor) for name, tensor in seen[8].items())

    with monkeypatch.context() as patch:  # killed after step 6's checkpoint: one evaluation without a lower
        killed_after_step(6, patch)
        with pytest.raises(KeyboardInterrupt):
            qsvd.finetune(**run_options | {"output": str(tmp_path / "killed")})
    qsvd.finetune(**run_options | {"output": str(tmp_path / "killed"), "resume": True})
    assert max(entry["step"] for entry in log(tmp_path / "killed")) == 8  # the patience count came back
    assert json.loads((tmp_path / "killed" / "qsvd_config.json").read_text())["best"] == record["best"]
    assert (tmp_path / "killed" / "adapter.safetensors").read_bytes() == \
        (tmp_path / "run" / "adapter.safetensors").read_bytes()  # and the best adapter


@pytest.mark.parametrize("extra, message", [
    (["--eval-steps", "2"], "--eval-steps scores the --eval-data files: give at least one"),
    (["--keep-best"], "--keep-best follows the held-out loss that --eval-steps N scores: give --eval-steps"),
    (["--early-stopping", "3"], "--early-stopping follows the held-out loss that --eval-steps N scores"),
    (["--eval-steps", "0"], "--eval-steps must be positive"),
])
def test_held_out_flags_are_checked_before_any_work(extra, message, tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, ["finetune", *tiny_run_args(tiny_model_dir, tmp_path / "run", *extra)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "run").exists()
