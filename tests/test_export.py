"""`qsvd export`: every method, at bits 16 and 4, as a PEFT adapter and as a merged checkpoint,
loaded back with PEFT and transformers; byte-stable merges; broken run dirs refused cleanly."""

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import qsvd
from qsvd.cli import cli
from qsvd.load import resolve_model
from qsvd.methods import METHODS
from qsvd.split import quantized_model

from conftest import char_tokenizer, tiny_config

# Rates at which three steps move every method's adapter well away from its init.
EXPORT_LR = {"lora": 1e-2, "dora": 1e-2, "pissa": 1e-2, "milora": 1e-2, "loraxs": 2e-1, "edora": 5e-2, "lorasb": 1e-1}
TEXT = "Ava has 3 apples. Bob gives her 12 more."


def train(model_dir: Path, output: Path, method: str = "edora", bits: int = 4):
    return qsvd.finetune(model=str(model_dir), method=method, bits=bits, rank=4, max_steps=3,
                         lr=EXPORT_LR[method], seq_len=400, batch_size=4, output=str(output)).model.eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    ids = char_tokenizer()(TEXT, return_tensors="pt")["input_ids"]
    return model.eval()(ids).logits


def load_hf(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def biggest_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("method", list(METHODS))
def test_exports_reproduce_the_trained_model(method, bits, tiny_model_dir, tmp_path):
    trained = logits(train(tiny_model_dir, tmp_path / "run", method, bits))
    base = logits(load_hf(tiny_model_dir))
    assert biggest_gap(trained, base) > 0.1  # the adapter moved the model, so the checks below mean something

    peft_dir = qsvd.export(tmp_path / "run", tmp_path / "peft")
    adapter_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == (8 if METHODS[method].moves_weight else 4)  # rank 2r for pissa and milora
    assert adapter_config["lora_alpha"] == adapter_config["r"]
    assert adapter_config["use_dora"] == (method in ("dora", "edora"))
    peft_logits = logits(PeftModel.from_pretrained(load_hf(tiny_model_dir), peft_dir))

    merged = {base: logits(load_hf(qsvd.export(tmp_path / "run", tmp_path / base, format="merged",
                                               base=base, dtype="fp32")))
              for base in ("original", "dequantized")}
    again = qsvd.export(tmp_path / "run", tmp_path / "again", format="merged", base="dequantized", dtype="fp32")
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "dequantized" / "model.safetensors").read_bytes()
    # Merging into the original weights is what PEFT computes; merging into deq(Q(W)) is the trained model.
    assert biggest_gap(merged["original"], peft_logits) < 1e-5
    assert biggest_gap(merged["dequantized"], trained) < 1e-5
    if bits == 16:
        assert biggest_gap(peft_logits, trained) < 1e-5
    else:  # on the original base the gap is that of quantizing the base itself (measured: 0.63-1.27×)
        quantized = logits(quantized_model(resolve_model(str(tiny_model_dir)), 4, "cpu", progress=False))
        assert biggest_gap(peft_logits, trained) < 1.5 * biggest_gap(quantized, base)


def test_merged_export_is_sharded_byte_stable_and_keeps_tied_weights(tmp_path):
    config = tiny_config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model_dir = tmp_path / "tied"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    train(model_dir, tmp_path / "run")

    first, second = (qsvd.export(tmp_path / "run", tmp_path / name, format="merged", shard_size="40KB")
                     for name in ("first", "second"))
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in files if name != "README.md")
    assert (first / "README.md").read_text().replace(str(first), str(second)) == (second / "README.md").read_text()

    index = json.loads((first / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(f for f in files if f.endswith(".safetensors"))
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, as HF does
    for shard in shards:
        with safe_open(first / shard, "pt") as f:
            assert all(f.get_tensor(name).dtype == torch.bfloat16 for name in f.keys())
    assert json.loads((first / "config.json").read_text())["dtype"] == "bfloat16"

    merged = AutoModelForCausalLM.from_pretrained(first, dtype=torch.bfloat16)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    exact = load_hf(qsvd.export(tmp_path / "run", tmp_path / "fp32", format="merged", dtype="fp32"))
    assert biggest_gap(logits(merged).float(), logits(exact)) < 0.1  # bf16 rounding of the weights only


def test_adapter_card_records_the_run(tiny_model_dir, tmp_path):
    qsvd.finetune(model=str(tiny_model_dir), method="milora", bits=4, rank=4, max_steps=2, lr=1e-2, seq_len=400,
                  batch_size=4, output=str(tmp_path / "run"), eval_data=[write_rows(tmp_path / "dev.json")])
    card = (qsvd.export(tmp_path / "run", tmp_path / "peft") / "README.md").read_text()
    assert card.startswith(f"---\nbase_model: {tiny_model_dir}\nlibrary_name: peft\n")
    for expected in ("| method | milora:", "| rank | 4 (alpha 4, s = 1) |", "| frozen base in training | 4-bit NF4 |",
                     "| data | built-in arithmetic word problems |", "| steps | 2 × batch 4", "| final training loss |",
                     "| eval: dev | gen: accuracy", "rank-8 PEFT LoRA adapter", "PeftModel.from_pretrained(base, ",
                     f"qsvd export {tmp_path / 'run'} --format gguf --gguf-type q8_0",
                     f"ollama create run -f {tmp_path / 'run-q8_0.Modelfile'} && ollama run run"):
        assert expected in card


def write_rows(path: Path) -> str:
    path.write_text(json.dumps([{"question": "What is 2 + 3?", "answer": "#### 5"}] * 2))
    return str(path)


def test_peft_targets_name_exactly_the_adapted_layers(tiny_model_dir, tmp_path):
    qsvd.finetune(model=str(tiny_model_dir), method="lora", bits=16, rank=4, max_steps=1, seq_len=400,
                  targets=["q_proj", "layers.1.mlp.up_proj"], output=str(tmp_path / "run"))
    config = json.loads((qsvd.export(tmp_path / "run", tmp_path / "peft") / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                                                "model.layers.1.self_attn.q_proj"]
    train(tiny_model_dir, tmp_path / "all", "lora", 16)
    config = json.loads((qsvd.export(tmp_path / "all", tmp_path / "all-peft") / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_cli_export_defaults_beside_the_run(tiny_model_dir, tmp_path):
    train(tiny_model_dir, tmp_path / "run", "loraxs")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run-peft" / "adapter_model.safetensors").is_file()
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--format", "merged", "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    with safe_open(tmp_path / "run-merged" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float16


def break_run(run: Path, how: str) -> None:
    adapter, record_path = run / "adapter.safetensors", run / "qsvd_config.json"
    if how == "missing adapter":
        adapter.unlink()
    elif how == "config not json":
        record_path.write_text(record_path.read_text()[:40])
    elif how == "record without spec":
        record = json.loads(record_path.read_text())
        del record["spec"]
        record_path.write_text(json.dumps(record))
    elif how == "log not json":
        (run / "train_log.jsonl").write_text("{'loss': 1.0")
    elif how == "truncated adapter":
        adapter.write_bytes(adapter.read_bytes()[:-100])
    elif how == "changed adapter":
        data = bytearray(adapter.read_bytes())
        data[-1] ^= 1
        adapter.write_bytes(bytes(data))
    elif how == "truncated adapter, no checksum":  # a run from before checksums were recorded
        record = json.loads(record_path.read_text())
        del record["adapter_sha256"]
        record_path.write_text(json.dumps(record))
        adapter.write_bytes(adapter.read_bytes()[:-100])
    elif how == "layer without tensors":
        record = json.loads(record_path.read_text())
        record["targets"].append("model.layers.9.mlp.up_proj")
        record_path.write_text(json.dumps(record))


@pytest.mark.parametrize("how, message", [
    ("missing adapter", "is not a complete qsvd run (no adapter.safetensors)"),
    ("config not json", "qsvd_config.json is corrupt (not JSON"),
    ("record without spec", "qsvd_config.json is corrupt (it has no spec)"),
    ("log not json", "train_log.jsonl is corrupt"),
    ("truncated adapter", "does not match the checksum"),
    ("changed adapter", "does not match the checksum"),
    ("truncated adapter, no checksum", "is not a readable safetensors file"),
    ("layer without tensors", "has no tensors for layer model.layers.9.mlp.up_proj"),
])
def test_broken_run_is_refused_and_nothing_is_written(how, message, tiny_model_dir, tmp_path):
    train(tiny_model_dir, tmp_path / "run", "lora", 16)
    break_run(tmp_path / "run", how)
    before = sorted(os.listdir(tmp_path))
    for format_ in ("peft", "merged"):
        result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--format", format_,
                                          "--output", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before  # no export dir, no temp dir


@pytest.mark.parametrize("args, message", [
    (["--base", "dequantized"], "a PEFT adapter always applies to the original base"),
    (["--format", "merged", "--shard-size", "0GB"], "--shard-size must be a positive size"),
    (["--format", "onnx"], "Invalid value for '--format'"),
])
def test_bad_export_flags(args, message, tiny_model_dir, tmp_path):
    train(tiny_model_dir, tmp_path / "run", "lora", 16)
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_export_keeps_an_existing_output_and_refuses_another_model(tiny_model_dir, tmp_path):
    train(tiny_model_dir, tmp_path / "run", "lora", 16)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "already holds files" in result.output
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--output", str(tmp_path / "out"), "--overwrite"])
    assert result.exit_code == 0 and not (tmp_path / "out" / "keep.txt").exists()

    record = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())
    record["model_fingerprint"] = "0" * 16
    (tmp_path / "run" / "qsvd_config.json").write_text(json.dumps(record))
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--output", str(tmp_path / "other")])
    assert result.exit_code == 2 and "is not the one" in result.output
    assert not (tmp_path / "other").exists()
