"""Tiny random Llama models and a character tokenizer, built here: no hub, no downloads."""

import json
import signal
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def last_json_line(args, tmp_path):
    """Run a benchmark script with `--workdir tmp_path`; the JSON object it prints last."""
    result = subprocess.run([sys.executable, *map(str, args), "--workdir", tmp_path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def pytest_configure(config):
    """The tests run as from a terminal, however pytest was started: a script's background job starts
    with SIGINT ignored, which this process and the ones it starts would keep (qsvd as Python does)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character."""
    vocab = {token: i for i, token in enumerate(SPECIALS + list(string.printable))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_config(bias: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                       attention_bias=bias, mlp_bias=bias)


def tiny_model(seed: int = 0, bias: bool = False) -> LlamaForCausalLM:
    """A 2-block random Llama; with `bias`, every projection has a (random) bias, as in Qwen."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(bias)).eval()
    if bias:
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                torch.nn.init.normal_(param, std=0.1)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with its tokenizer, loadable as --model DIR."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.mktemp("qsvd-cache")
    monkeypatch.setenv("QSVD_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A qsvd cache for the embedded model (SmolLM2-135M-Instruct), shared by the tests that use it."""
    from qsvd.load import embedded_gguf

    try:
        embedded_gguf()
    except Exception as error:  # the README's set-up installs it; say so plainly if it is missing
        pytest.fail(f"the embedded model is not installed: {error}")
    return tmp_path_factory.mktemp("qsvd-cache")


def fake_gpus(monkeypatch, count: int = 1, capability: tuple[int, int] = (8, 0), name: str = "NVIDIA A100"):
    """Make torch report `count` CUDA GPUs of this compute capability on this CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def tiny_run_args(model_dir, output, *extra) -> list[str]:
    """`qsvd finetune`'s flags for a short edora run of a tiny model; a flag in `extra` overrides its default."""
    return [str(arg) for arg in ["--model", model_dir, "--output", output, "--method", "edora", "--bits", 4, "--rank", 4,
                                 "--seq-len", 400, "--batch-size", 4, "--max-steps", 12, "--save-steps", 2, "--lr", 3e-2,
                                 *extra]]


def killed_after_step(step, monkeypatch):
    """Make the run die as a kill would, just after its checkpoint of `step` is sealed."""
    from qsvd import checkpoints

    seal = checkpoints.SealCheckpoints.on_save

    def seal_then_die(self, args, state, control, **kwargs):
        seal(self, args, state, control, **kwargs)
        if state.global_step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.SealCheckpoints, "on_save", seal_then_die)
