"""Preference tuning (--objective dpo|orpo): the pair forms, the reference, TRL's losses and
metrics as the oracle, LoRA-SB's init from DPO's gradient, and `qsvd eval --task pref`."""

import importlib
import json
import math
import random
import subprocess
import sys
from collections import defaultdict
from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace

import datasets
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

import qsvd
from qsvd.batching import Batching, batch_collator
from qsvd.cli import cli
from qsvd.config import FinetuneConfig
from qsvd.data import TrainingRows, detect_shape, read_eval_rows, tokenize_rows, training_rows
from qsvd.errors import QSVDError
from qsvd.evaluate import evaluate_model, pair_log_likelihoods_of
from qsvd.loss import supervised_token_losses
from qsvd.memory import LiveTensors
from qsvd.methods import METHODS
from qsvd.methods.lorasb import estimate_gradients
from qsvd.objectives import DPO, ORPO, halves, pair_log_likelihoods, start_loss
from qsvd.run_dir import read_run
from qsvd.split import adapter_layers
from conftest import char_tokenizer, killed_after_step, tiny_model

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
recipe = importlib.import_module("qsvd.finetune")  # the module: `qsvd.finetune` is also the function
QUESTION, CHOSEN, REJECTED = "What is 2+2?", "4", "5"
FORMS = {
    "strings": {"prompt": QUESTION, "chosen": CHOSEN, "rejected": REJECTED},
    "messages": {"prompt": [{"role": "user", "content": QUESTION}],
                 "chosen": [{"role": "assistant", "content": CHOSEN}],
                 "rejected": [{"role": "assistant", "content": REJECTED}]},
    "conversations": {"chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": CHOSEN}],
                      "rejected": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": REJECTED}]},
    "hh": {"chosen": f"\n\nHuman: {QUESTION}\n\nAssistant: {CHOSEN}",
           "rejected": f"\n\nHuman: {QUESTION}\n\nAssistant: {REJECTED}"},
}


def templated_tokenizer():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tokenized(rows, tmp_path, seq_len=200, truncate=False, tokenizer=None):
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    return tokenize_rows(training_rows(str(data), objective="dpo"), tokenizer or templated_tokenizer(), seq_len,
                         truncate)


def arithmetic_pairs(count: int, seed: int = 0) -> list[dict]:
    """'a+b=' with the right sum chosen and a wrong one rejected."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        pairs.append({"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + rng.randint(1, 9)}"})
    return pairs


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", arithmetic_pairs(16))


# -- the data --------------------------------------------------------------------------------

def test_every_pair_form_renders_the_same_rows_with_the_chat_template_and_loss_on_the_response_only(tmp_path):
    tokenizer = templated_tokenizer()
    rows = {form: tokenized([row], tmp_path, tokenizer=tokenizer).rows[0] for form, row in FORMS.items()}
    assert all(row == rows["strings"] for row in rows.values())
    for side, response in (("chosen", CHOSEN), ("rejected", REJECTED)):
        ids, labels = rows["strings"][f"{side}_input_ids"], rows["strings"][f"{side}_labels"]
        prompt = [token for token, label in zip(ids, labels) if label == -100]
        assert tokenizer.decode(prompt) == f"<|user|>{QUESTION}\n<|assistant|>"
        assert tokenizer.decode([label for label in labels if label != -100]) == f"{response}\n"


def test_long_identical_and_diverging_pairs_are_skipped_and_counted(tmp_path):
    long = {"prompt": "x" * 150, "chosen": "a", "rejected": "b"}
    same = {"prompt": "q", "chosen": "same", "rejected": "same"}
    diverging = {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hello\n\nAssistant: b"}
    empty = {"prompt": "q", "chosen": "", "rejected": "b"}
    result = tokenized([FORMS["strings"], long, same, diverging, empty], tmp_path, seq_len=100)
    assert len(result.rows) == 1 and result.skipped == {
        "longer than --seq-len 100": 1, "with identical chosen and rejected responses": 1,
        "whose chosen and rejected conversations differ before their last turn": 1, "with an empty response": 1}
    assert result.line().startswith("1 of 5 rows kept, 4 skipped")
    cut = tokenized([{"prompt": "q", "chosen": "a" * 300, "rejected": "b"}], tmp_path, seq_len=100, truncate=True)
    assert [len(cut.rows[0]["chosen_input_ids"]), len(cut.rows[0]["rejected_input_ids"])] == [100, 25]


@pytest.mark.parametrize("row, why", [
    ({"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}, "chosen is a dict, not text"),
    ({"chosen": "just text", "rejected": "other text"}, "not an HH transcript"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "turn 1 of prompt has no 'role' and 'content'"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
     "the last turn of chosen is the user's"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen has a turn that is not"),
])
def test_a_malformed_pair_is_an_error_naming_its_row_before_any_model_loads(row, why, tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "pairs.jsonl", [FORMS["strings"], FORMS["hh"], row])
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--objective", "dpo",
                                      "--data", str(data), "--output", str(tmp_path / "run")])
    last = result.output.strip().splitlines()[-1]
    assert result.exit_code == 2 and last.startswith(f"error: --data {data} row 3: ") and why in last, result.output
    assert "split + quantize" not in result.output and not (tmp_path / "run").exists()


def test_the_objective_must_fit_the_rows_and_its_options(tmp_path, pairs_file):
    sft_rows = write_rows(tmp_path / "sft.jsonl", [{"question": "q", "answer": "a"}])
    for options, message in [
        ({"objective": "dpo", "data": str(sft_rows)}, "--objective dpo trains on preference pairs"),
        ({"objective": "orpo"}, "give them with --data"),
        ({"data": str(pairs_file)}, "holds preference pairs (chosen/rejected): train them with --objective dpo or orpo"),
    ]:
        config = FinetuneConfig.resolve(**options)
        with pytest.raises(QSVDError, match=message.replace("(", r"\(").replace(")", r"\)")):
            training_rows(config.data, objective=config.objective)
    for options, message in [({"objective": "kto"}, "--objective must be one of sft, dpo, orpo"),
                             ({"objective": "dpo", "batching": "packed"}, "--batching packed would pack rows across pairs"),
                             ({"beta": 0.2}, "--beta applies to --objective dpo and orpo, not sft"),
                             ({"objective": "dpo", "orpo_lambda": 0.2}, "--orpo-lambda applies to --objective orpo"),
                             ({"objective": "dpo", "beta": -1.0}, "--beta must be positive"),
                             ({"objective": "dpo", "eval_data": ["x"], "eval_steps": 2}, "--eval-steps scores a supervised")]:
        with pytest.raises(QSVDError, match=message):
            FinetuneConfig.resolve(**options)
    assert detect_shape(["prompt", "chosen", "rejected"], "x").name == "pairs"


# -- the losses and metrics, against TRL's --------------------------------------------------

def pair_batch(pairs, tokenizer=None):
    tokenizer = tokenizer or char_tokenizer()
    rows = tokenize_rows(TrainingRows(datasets.Dataset.from_list(pairs), detect_shape([*pairs[0]], "x"), "x"), tokenizer,
                        200).rows
    return batch_collator(tokenizer, Batching("padded", "test"), pairs=True)([rows[i] for i in range(len(rows))])


def per_token_log_likelihoods(model, batch):
    """[2B, L − 1] log p of each supervised token, 0 elsewhere: what TRL's fused head hands its loss."""
    losses, mask = supervised_token_losses(model, batch, reduction="none")
    values = torch.zeros(mask.shape)
    values[mask] = -losses.detach()
    return values, mask


class Gathers:
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def trl_dpo(per_token, mask, batch, reference, beta):
    """TRL's DPOTrainer._compute_loss on these per-token log-likelihoods and reference."""
    from trl import DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)
    vars(trainer).update(model=SimpleNamespace(training=True), accelerator=Gathers(), precompute_ref_logps=True,
                         ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0],
                         beta=beta, aux_loss_enabled=False, use_weighting=False, label_smoothing=0.0, _metrics={"train": defaultdict(list)},
                         _total_train_tokens=0, _tp_size=1)
    rows, length = per_token.shape
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(rows, length),
                              mean_logits=torch.zeros(rows, length), is_top1=torch.zeros(rows, length, dtype=torch.bool))
    completion = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)
    chosen, rejected = halves(reference)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": completion, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, {key: values[0] for key, values in trainer._metrics["train"].items()}


def trl_orpo(sums, counts, beta):
    """TRL's ORPOTrainer.get_batch_loss_metrics on these log-likelihoods (TRL's β is ORPO's λ)."""
    from trl.experimental.orpo import ORPOTrainer

    trainer = ORPOTrainer.__new__(ORPOTrainer)
    mean = sums / counts
    chosen_sums, _ = halves(sums)
    chosen_counts, _ = halves(counts)
    nll = -chosen_sums.sum() / chosen_counts.sum()
    vars(trainer).update(beta=beta, aux_loss_enabled=False, accelerator=Gathers(),
                         concatenated_forward=lambda model, batch: (*halves(mean), torch.zeros(1), torch.zeros(1), nll))
    return trainer.get_batch_loss_metrics(None, {})


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


def test_dpo_and_orpo_losses_and_metrics_equal_trls_on_the_same_batch_and_log_likelihoods():
    model = qsvd.prepare(tiny_model(), "lora", bits=16, rank=4, device="cpu", progress=False)
    batch = pair_batch(arithmetic_pairs(6, seed=3))
    sums, counts = pair_log_likelihoods(model, batch)
    per_token, mask = per_token_log_likelihoods(model, batch)
    reference = sums.detach() + torch.randn(sums.shape, generator=torch.Generator().manual_seed(0))
    for beta in (0.1, 0.5):
        loss, metrics = DPO(beta).loss(sums, counts, reference)
        expected_loss, expected = trl_dpo(per_token, mask, batch, reference, beta)
        assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)
        for key in METRICS:
            assert metrics[key].mean().item() == pytest.approx(expected[key], abs=1e-5), key
        assert 0 < expected["rewards/accuracies"] < 1  # the batch has pairs either way

        loss, metrics = ORPO(beta, beta).loss(sums, counts)
        expected_loss, expected = trl_orpo(sums.detach(), counts, beta)
        assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-5)
        for key in (*METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen"):
            assert metrics[key].mean().item() == pytest.approx(expected[key], abs=1e-5), key


def test_the_logged_metrics_of_each_step_equal_trls_on_that_steps_log_likelihoods(tiny_model_dir, pairs_file,
                                                                                 tmp_path, monkeypatch):
    seen = []
    loss = DPO.loss

    def recorded(self, sums, counts, reference):
        seen.append((sums.detach().clone(), counts.clone(), reference.clone()))
        return loss(self, sums, counts, reference)

    monkeypatch.setattr(DPO, "loss", recorded)
    qsvd.finetune(model=str(tiny_model_dir), data=str(pairs_file), objective="dpo", beta=0.3, method="pissa", rank=4,
                  batch_size=4, max_steps=3, lr=3e-2, output=str(tmp_path / "run"), seq_len=64, save_steps=None)
    log = [entry for entry in map(json.loads, (tmp_path / "run" / "train_log.jsonl").read_text().splitlines())
           if "loss" in entry]
    assert len(log) == len(seen) == 3
    for entry, (sums, counts, reference) in zip(log, seen):
        chosen, rejected = halves(0.3 * (sums - reference))
        assert entry["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(chosen - rejected).mean().item(), abs=1e-5)
        assert entry["rewards/margins"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
        assert entry["rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item(), abs=1e-6)
        assert entry["logps/chosen"] == pytest.approx(halves(sums)[0].mean().item(), abs=1e-4)
    assert log[0]["rewards/margins"] == 0 and log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # π = π_ref
    assert log[-1]["rewards/margins"] != 0
    assert Image.open(tmp_path / "run" / "loss.png").size == (700, 700)  # the loss, and the rewards under it


# -- the reference ---------------------------------------------------------------------------

@contextmanager
def adapters_disabled(model):
    """Each adapted layer as its frozen base alone, as PEFT's disable_adapter() gives a model."""
    layers = adapter_layers(model).values()
    for layer in layers:
        layer.forward = layer.base.forward
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def preference_run(monkeypatch, output, **options):
    """A DPO run whose starting model's and adapter-disabled model's log-likelihoods of every pair
    are taken just before its reference is; returns them, the reference, and the run's peak of live
    tensor bytes."""
    seen = {}
    reference = recipe.dpo_reference

    def taken(model, dataset, tokenizer, config, batching, work):
        seen["start"] = pair_log_likelihoods_of(model, tokenizer, dataset, 3, "start")[0]
        with adapters_disabled(model):
            seen["disabled"] = pair_log_likelihoods_of(model, tokenizer, dataset, 3, "disabled")[0]
        dataset, adapter = reference(model, dataset, tokenizer, config, batching, work)
        seen["reference"] = torch.tensor([dataset["reference_chosen"], dataset["reference_rejected"]], dtype=torch.float64).T
        return dataset, adapter

    monkeypatch.setattr(recipe, "dpo_reference", taken)
    with LiveTensors(0) as live:
        qsvd.finetune(output=str(output), **options)
    return seen, live.peak


SHAPE = dict(rank=4, batch_size=4, max_steps=2, lr=3e-2, seq_len=64, save_steps=None, batching="padded")


@pytest.mark.parametrize("method", list(METHODS))
def test_the_reference_is_the_starting_model_not_the_adapter_disabled_one_and_costs_no_memory(
        method, tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    # lorasb's init step at --init-lr 1e-2: DPO's default η (1e-6) would leave its start nearly the base's
    options = dict(model=str(tiny_model_dir), method=method, **SHAPE, init_lr=1e-2)
    seen, dpo_peak = preference_run(monkeypatch, tmp_path / "dpo", data=str(pairs_file), objective="dpo", **options)
    assert torch.allclose(seen["reference"], seen["start"], atol=1e-4)
    if METHODS[method].moves_weight or METHODS[method].needs_gradient_init:  # pissa, milora, lorasb
        assert (seen["reference"] - seen["disabled"]).abs().max() > 1e-2
    # SFT on the same rows (each pair's two) in batches of as many rows: the same shapes a step
    pairs = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    rows = write_rows(tmp_path / "rows.jsonl", [{"prompt": p["prompt"], "response": p[side]}
                                                for p in pairs for side in ("chosen", "rejected")])
    sft = options | {"batch_size": 2 * SHAPE["batch_size"]}
    with LiveTensors(0) as live:
        qsvd.finetune(output=str(tmp_path / "sft"), data=str(rows), prompt_field="prompt", response_field="response",
                      **sft)
    assert dpo_peak <= 1.05 * live.peak, (dpo_peak, live.peak)

    # `qsvd eval` takes the run's reference adapter for π_ref: the rewards are β(π − π_ref) against the start
    result = qsvd.evaluate(tmp_path / "dpo", pairs_file, task="pref")
    predictions = [json.loads(line) for line in open(result.predictions)]
    evaluated = torch.tensor([[p["chosen_logp"] - p["chosen_reward"] / 0.1, p["rejected_logp"] - p["rejected_reward"] / 0.1]
                              for p in predictions], dtype=torch.float64)
    assert torch.allclose(evaluated, seen["reference"], atol=1e-3)


# -- LoRA-SB's init --------------------------------------------------------------------------

def test_lorasb_estimates_dpos_gradient_at_the_start():
    """At π = π_ref, ∇L_DPO = −(β/2)·mean_pairs(∇π(y_c) − ∇π(y_r)): the estimate's G is that."""
    batch = pair_batch(arithmetic_pairs(4, seed=5))
    model = qsvd.prepare(tiny_model(), "lorasb", bits=16, rank=4, device="cpu", progress=False, lr=1e-3,
                         grad_batches=[{key: batch[key] for key in ("input_ids", "attention_mask", "labels")}])
    layers = adapter_layers(model)

    def expected_loss(model, batch):
        chosen, rejected = halves(pair_log_likelihoods(model, batch)[0])
        return -(0.2 / 2) * (chosen - rejected).mean()

    got = estimate_gradients(model, layers, [batch], loss=partial(start_loss, DPO(0.2)))
    expected = estimate_gradients(model, layers, [batch], loss=expected_loss)
    sft = estimate_gradients(model, layers, [batch])
    for name in layers:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-8), name
        assert not torch.allclose(got[name].sign(), sft[name].sign())  # not the supervised gradient


# -- dtypes, resume, export, eval -------------------------------------------------------------

@pytest.mark.parametrize("method, objective, dtype", [("lorasb", "dpo", "bf16"), ("milora", "orpo", "fp16"),
                                                      ("edora", "dpo", "fp16")])
def test_preference_runs_train_resume_evaluate_and_export_in_the_dtype(method, objective, dtype, tiny_model_dir,
                                                                      pairs_file, tmp_path, monkeypatch):
    options = dict(model=str(tiny_model_dir), data=str(pairs_file), objective=objective, method=method, dtype=dtype,
                   rank=4, batch_size=4, max_steps=4, save_steps=1, lr=3e-2, seq_len=64, batching="padding-free")
    trained = qsvd.finetune(output=str(tmp_path / "run"), **options).model
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(entry["loss"]) and "rewards/accuracies" in entry for entry in log if "loss" in entry)
    if objective == "dpo":
        assert abs(log[0]["rewards/margins"]) < 0.05  # the reference, under the same autocast

    with monkeypatch.context() as patch:
        killed_after_step(2, patch)
        with pytest.raises(KeyboardInterrupt):
            qsvd.finetune(output=str(tmp_path / "killed"), **options)
        patch.setattr(recipe, "reference_log_likelihoods", None)  # a resumed run reuses the work dir's reference
        qsvd.finetune(output=str(tmp_path / "killed"), resume=True, **options)
    assert (tmp_path / "killed" / "adapter.safetensors").read_bytes() == \
        (tmp_path / "run" / "adapter.safetensors").read_bytes()

    rebuilt = qsvd.evaluate(tmp_path / "run", pairs_file, task="pref")
    record = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())
    objective_of_run = FinetuneConfig.resolve(objective=objective).pair_objective
    reference = read_run(tmp_path / "run").reference_adapter
    assert (reference is not None) == (objective == "dpo") == ("reference_adapter_sha256" in record)
    in_memory = evaluate_model(trained, char_tokenizer(), read_eval_rows(pairs_file), "pref", tmp_path / "p.jsonl",
                               objective=objective_of_run, reference_adapter=reference)
    assert rebuilt.correct == in_memory.correct and rebuilt.margin == pytest.approx(in_memory.margin, abs=1e-3)
    qsvd.export(tmp_path / "run", tmp_path / "merged", format="merged", dtype="fp32")
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_eval_pref_of_a_plain_model_compares_log_likelihood_per_token(tiny_model_dir, pairs_file, tmp_path):
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", str(pairs_file),
                                      "--predictions", str(tmp_path / "p.jsonl")])
    assert result.exit_code == 0, result.output
    predictions = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(predictions) == 16
    for p in predictions:
        assert p["chosen_reward"] == pytest.approx(p["chosen_logp"] / p["chosen_tokens"], abs=1e-5)
        assert p["correct"] == (p["chosen_reward"] > p["rejected_reward"])
    correct = sum(p["correct"] for p in predictions)
    assert f"preference accuracy {100 * correct / 16:.1f}% ({correct}/16)" in result.output
    assert "reward: per-token log-likelihood" in result.output
    margins = [p["margin"] for p in predictions]
    assert f"mean margin {sum(margins) / 16:.4f}" in result.output

    for task, rows, message in [("gen", pairs_file, "holds preference pairs (chosen/rejected): it takes --task pref"),
                                ("pref", write_rows(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}]),
                                 "--task pref needs preference pairs")]:
        result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", str(rows), "--task", task])
        assert result.exit_code == 2 and message in result.output



def test_two_processes_train_dpo_as_one_process_does_on_the_same_global_batch(tiny_model_dir, pairs_file, tmp_path):
    """Under `accelerate launch` (2 gloo processes), the main process computes the reference and
    the other reuses it, and the logged rewards are the means over both processes' pairs: the
    log and the adapter are one process's on the same global batch."""
    common = ["finetune", "--model", tiny_model_dir, "--objective", "dpo", "--data", pairs_file, "--method", "pissa",
              "--bits", 4, "--rank", 4, "--max-steps", 3, "--lr", 3e-2, "--batching", "grouped", "--seq-len", 64,
              "--save-steps", 2]
    two = subprocess.run([sys.executable, "-m", "qsvd", *map(str, common), "--batch-size", "2", "--output",
                          str(tmp_path / "two"), "--num-processes", "2"], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stderr.count("dpo reference log-likelihoods") == 1
    one = CliRunner().invoke(cli, [*map(str, common), "--batch-size", "4", "--output", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    logs = [[entry for entry in map(json.loads, (tmp_path / run / "train_log.jsonl").read_text().splitlines())
             if "loss" in entry] for run in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 3
    for key in ("loss", *METRICS):
        assert [entry[key] for entry in logs[0]] == pytest.approx([entry[key] for entry in logs[1]], abs=1e-5), key
    assert logs[0][-1]["rewards/margins"] != 0
    adapters = [load_file(tmp_path / run / "adapter.safetensors") for run in ("one", "two")]
    assert max((adapters[0][key] - adapters[1][key]).abs().max().item() for key in adapters[0]) < 1e-5
