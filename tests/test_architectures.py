"""Architectures beyond Llama, end to end on tiny random models, as safetensors and as GGUF where
transformers reads the architecture from GGUF: finetune 2 steps at 4 bits, export, and PEFT on the
original weights gives the merged export's logits. Every method runs on one in each form."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import (AutoModelForCausalLM, Gemma2Config, MistralConfig, MixtralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config)

import qsvd

from conftest import char_tokenizer
from gguf_files import write_gguf

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)
CONFIGS = {
    "mistral": lambda: MistralConfig(**SIZES, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**SIZES, tie_word_embeddings=False),  # biases on q, k, v
    "qwen3": lambda: Qwen3Config(**SIZES, tie_word_embeddings=False),  # q and k norms; head_dim 128, as GGUF assumes
    "gemma2": lambda: Gemma2Config(**SIZES, head_dim=16),  # soft-capping, tied embeddings
    "phi3": lambda: Phi3Config(**SIZES, tie_word_embeddings=False),  # fused qkv_proj and gate_up_proj
    "mixtral": lambda: MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
}
# (architecture, method): every method on a non-Llama architecture
RUNS = [("mistral", "lora"), ("qwen2", "dora"), ("qwen3", "loraxs"), ("gemma2", "milora"), ("phi3", "lorasb"),
        ("mixtral", "edora"), ("mistral", "pissa")]
# GGUF as llama.cpp writes it: a Mistral checkpoint as architecture "llama"; Mixtral's experts transformers
# does not read from GGUF
GGUF_RUNS = [("mistral", "edora"), ("qwen2", "pissa"), ("qwen3", "milora"), ("gemma2", "lora"), ("phi3", "dora"),
             ("qwen2", "loraxs"), ("gemma2", "lorasb")]
GGUF_ARCHITECTURE = {"mistral": "llama"}
LR = {"lora": 1e-2, "dora": 1e-2, "pissa": 1e-2, "milora": 1e-2, "loraxs": 2e-1, "edora": 5e-2, "lorasb": 1e-1}
TEXT = "Ava has 3 apples. Bob gives her 12 more."


def save_tiny(architecture: str, path) -> None:
    """A tiny random model of `architecture`, every tensor (biases and norms too) drawn at random."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[architecture]())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0, 0.1 if name.endswith("bias") else 0.5)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Each architecture saved once, in its own hub layout (Mixtral's experts as w1, w2, w3)."""
    dirs = {}
    for architecture in CONFIGS:
        dirs[architecture] = tmp_path_factory.mktemp(architecture)
        save_tiny(architecture, dirs[architecture])
    return dirs


@torch.no_grad()
def logits(model) -> torch.Tensor:
    ids = char_tokenizer()(TEXT, return_tensors="pt")["input_ids"]
    return model.eval()(ids).logits


def load_hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("architecture,method", RUNS)
def test_architecture_trains_and_exports_to_peft(architecture, method, model_dirs, tmp_path):
    model_dir = model_dirs[architecture]
    record = train_and_compare_exports(str(model_dir), method, lambda: load_hf(model_dir), tmp_path)
    kinds = {name.rsplit(".", 1)[-1] for name in record["targets"]}
    expected = {"mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},  # experts are fused 3-D tensors, not Linear
                "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}
    assert kinds == expected.get(architecture, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"})


@pytest.mark.parametrize("architecture,method", GGUF_RUNS)
def test_architecture_from_gguf_trains_and_exports_to_peft(architecture, method, model_dirs, tmp_path):
    original = load_hf(model_dirs[architecture])
    gguf = write_gguf(original, tmp_path / f"{architecture}.gguf", GGUF_ARCHITECTURE.get(architecture))

    def load_gguf():
        return AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32)

    assert (logits(load_gguf()) - logits(original)).abs().max() < 1e-5  # the file holds the model
    train_and_compare_exports(str(gguf), method, load_gguf, tmp_path)


def train_and_compare_exports(model: str, method: str, load_base, tmp_path) -> dict:
    """Train 2 steps, export both ways; PEFT on `load_base()` must give the merged export's logits.
    Returns the run record."""
    trained = qsvd.finetune(model=model, method=method, bits=4, rank=4, max_steps=2, lr=LR[method], seq_len=400,
                            batch_size=4, grad_samples=4, output=str(tmp_path / "run"))
    assert torch.isfinite(torch.tensor(trained.final_loss))
    peft_dir = qsvd.export(tmp_path / "run", tmp_path / "peft")
    merged_dir = qsvd.export(tmp_path / "run", tmp_path / "merged", format="merged", dtype="fp32")
    merged = logits(load_hf(merged_dir))
    peft = logits(PeftModel.from_pretrained(load_base(), peft_dir))
    assert (merged - logits(load_base())).abs().max() > 1e-3  # the adapter moved the model: the check means something
    assert (peft - merged).abs().max() < 1e-4
    return json.loads((tmp_path / "run" / "qsvd_config.json").read_text())


def test_mixtral_experts_are_read_through_transformers_conversion(model_dirs):
    """The checkpoint holds each expert's w1, w2, w3; the model's fused tensors are built from them."""
    from qsvd.load import empty_model, resolve_model
    from qsvd.weights import SafetensorsWeights

    files = resolve_model(str(model_dirs["mixtral"]))
    weights = SafetensorsWeights(files.weights, empty_model(files))
    reference = load_hf(model_dirs["mixtral"])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(weights.read(name), tensor), name
