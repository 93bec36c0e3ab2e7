"""Every broken, partial or unsupported model input is one `error:` line naming the file and what is
wrong, exit code 2, no traceback, and nothing written, whichever command reads it."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import qsvd
from qsvd.cli import cli


def rewrite_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


def rewrite_weights(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


def truncate(file: Path, keep: float) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


def shard_index(path: Path, shards: list[str]) -> None:
    weight_map = {name: shards[i % len(shards)] for i, name in enumerate(load_file(path / "model.safetensors"))}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def shrink_vocabulary(path: Path) -> None:
    """A model of 50 tokens beside the tokenizer of 104."""
    rewrite_config(path, vocab_size=50)
    rewrite_weights(path, lambda t: t.update({name: t[name][:50].contiguous()
                                              for name in ("model.embed_tokens.weight", "lm_head.weight")}))


def dangling_link(file: Path) -> None:
    file.unlink()
    file.symlink_to(file.with_name("gone"))


DAMAGE = {  # how: (damage, what the error line says)
    "config not JSON": (lambda p: (p / "config.json").write_text("{ not json"), "config.json cannot be read"),
    "config empty": (lambda p: (p / "config.json").write_text(""), "config.json cannot be read"),
    "config a list": (lambda p: (p / "config.json").write_text("[1, 2]"), "config.json cannot be read"),
    "config without model_type": (lambda p: (p / "config.json").write_text('{"hidden_size": 64}'),
                                  "config.json cannot be read"),
    "unknown architecture": (lambda p: rewrite_config(p, model_type="llama9"), "config.json cannot be read"),
    "not a causal LM": (lambda p: (p / "config.json").write_text('{"model_type": "t5"}'),
                        "is not a causal language model that transformers can build"),
    "no linear layers": (lambda p: (p / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}'),
                         "gpt2 has no linear layers (torch.nn.Linear) for qsvd to adapt"),
    "multimodal": (lambda p: (p / "config.json").write_text('{"model_type": "llava"}'), "is a multimodal model"),
    "already quantized": (lambda p: rewrite_config(p, quantization_config={"quant_method": "gptq", "bits": 4}),
                          "the model is already quantized (gptq)"),
    "impossible sizes": (lambda p: rewrite_config(p, num_attention_heads=0), "config.json cannot be read"),
    "config of another size": (lambda p: rewrite_config(p, intermediate_size=96),
                               "model.safetensors: model.layers.0.mlp.gate_proj.weight is (128, 64), but the model's "
                               "config makes it (96, 64)"),
    "code of its own": (lambda p: rewrite_config(p, model_type="custom", auto_map={"AutoConfig": "custom.Config"}),
                        "if you trust the repository's code, pass --trust-remote-code"),
    "weights a broken link": (lambda p: dangling_link(p / "model.safetensors"), "(a broken link?)"),
    "tokenizer of another model": (shrink_vocabulary, "uses token ids up to 103, but the model's vocabulary"),
    "weights truncated": (lambda p: truncate(p / "model.safetensors", 0.5), "model.safetensors is not a readable"),
    "weights empty": (lambda p: (p / "model.safetensors").write_bytes(b""), "model.safetensors is not a readable"),
    "weights garbage": (lambda p: (p / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nonsense"),
                        "model.safetensors is not a readable"),
    "weights missing a layer": (lambda p: rewrite_weights(p, lambda t: t.pop("model.layers.1.mlp.down_proj.weight")),
                                "the checkpoint has no tensor model.layers.1.mlp.down_proj.weight"),
    "weights missing a norm": (lambda p: rewrite_weights(p, lambda t: t.pop("model.norm.weight")),
                               "the checkpoint has no tensor model.norm.weight"),
    "weights quantized": (lambda p: rewrite_weights(p, lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64, dtype=torch.int8)})), "is torch.int8, not floating"),
    "weights only pickle": (lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin"),
                            "has only pickle weights (pytorch_model.bin)"),
    "index names a missing shard": (lambda p: shard_index(p, ["model.safetensors", "model-2.safetensors"]),
                                    "names model-2.safetensors, which is not in"),
    "index corrupt": (lambda p: (p / "model.safetensors.index.json").write_text("{"), "is corrupt (not JSON"),
    "tokenizer corrupt": (lambda p: (p / "tokenizer.json").write_text("{ broken"), "the tokenizer in"),
    "tokenizer missing": (lambda p: [(p / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
                          "the tokenizer in"),
}


@pytest.fixture
def broken(tiny_model_dir, tmp_path):
    """A copy of the tiny model, for a test to damage."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def assert_one_error_line(result, message):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert "Traceback" not in result.output and result.output.count("error: ") == 1


@pytest.mark.parametrize("how", list(DAMAGE))
def test_finetune_and_init_refuse_a_broken_model(how, broken, tmp_path, isolated_cache):
    damage, message = DAMAGE[how]
    damage(broken)
    assert_one_error_line(run("finetune", "--model", broken, "--output", tmp_path / "run", "--max-steps", 1), message)
    assert_one_error_line(run("init", "--model", broken), message)
    assert not (tmp_path / "run").exists() and not list(isolated_cache.rglob("*.safetensors"))


PLAIN_MODEL = ["config not JSON", "not a causal LM", "no linear layers", "already quantized", "weights truncated",
               "weights quantized", "weights only pickle", "tokenizer corrupt"]


@pytest.mark.parametrize("how", PLAIN_MODEL)
def test_eval_and_plan_refuse_a_broken_model(how, broken, tmp_path):
    damage, message = DAMAGE[how]
    damage(broken)
    data = tmp_path / "dev.jsonl"
    data.write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    assert_one_error_line(run("eval", broken, "--data", data, "--predictions", tmp_path / "p.jsonl"), message)
    assert not (tmp_path / "p.jsonl").exists()
    if how in ("config not JSON", "not a causal LM", "no linear layers", "already quantized"):  # plan reads the config alone
        assert_one_error_line(run("plan", "--model", broken), message)


def test_export_refuses_a_base_model_broken_after_training(broken, tmp_path):
    qsvd.finetune(model=str(broken), method="lora", rank=4, max_steps=1, seq_len=400, output=str(tmp_path / "run"))
    qsvd.export(tmp_path / "run", tmp_path / "adapter")
    for model, message in [(tmp_path / "run", "is a qsvd run, not a model: `qsvd eval` scores it"),
                           (tmp_path / "adapter", "is a PEFT adapter, not a model: pass the base model"),
                           (broken / "model.safetensors", "is not a GGUF file (it does not start with 'GGUF'); pass the "
                                                          "directory that holds it and config.json")]:
        assert_one_error_line(run("finetune", "--model", model, "--output", tmp_path / "again"), message)
        assert_one_error_line(run("plan", "--model", model), message)
    for how, formats, message in [("tokenizer corrupt", ["merged"], "the tokenizer in"),  # an adapter has none
                                  ("weights truncated", ["peft", "merged"], f"the model {broken} is not the one")]:
        DAMAGE[how][0](broken)
        for format in formats:
            assert_one_error_line(run("export", tmp_path / "run", "--format", format, "--output", tmp_path / "out"),
                                  message)
            assert not (tmp_path / "out").exists()


def gguf_of_another_architecture(path: Path) -> None:
    """A well-formed GGUF of an encoder (BERT), which transformers does not read from GGUF."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


GGUF_DAMAGE = {
    "another architecture": gguf_of_another_architecture,
    "magic only": lambda path: path.write_bytes(b"GGUF"),
    "header of another version": lambda path: path.write_bytes(b"GGUF" + (99).to_bytes(4, "little") + bytes(64)),
    "truncated": lambda path: truncate(path, 0.3),
}


@pytest.mark.parametrize("how", list(GGUF_DAMAGE))
def test_a_broken_gguf_is_one_line(how, tmp_path, isolated_cache):
    from qsvd.load import embedded_gguf

    gguf = tmp_path / "model.gguf"
    shutil.copyfile(embedded_gguf(), gguf)
    GGUF_DAMAGE[how](gguf)
    message = f"{gguf} cannot be read as a GGUF model by transformers"
    assert_one_error_line(run("finetune", "--model", gguf, "--output", tmp_path / "run"), message)
    assert_one_error_line(run("plan", "--model", gguf), message)
    assert not (tmp_path / "run").exists() and not list(isolated_cache.rglob("*.json"))

