"""What the benchmarks against PEFT share: the embedded model as safetensors, and PEFT's QLoRA/QDoRA."""

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the project's real data, read in place


def write_smollm2(path: Path) -> None:
    """The embedded SmolLM2-135M as bf16 safetensors (once), so that both stacks read the same files."""
    if (path / "config.json").is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qsvd.load import embedded_gguf

    gguf = embedded_gguf()
    print(f"writing {gguf.name} as safetensors to {path} ...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(path)


def child_figures(name: str, command: list, log: Path, env: dict | None = None) -> dict:
    """Run one benchmark child process (its stderr into `log`) and return the JSON object its last
    line prints; if it fails, exit with the end of its log."""
    with open(log, "w") as stderr:
        result = subprocess.run(list(map(str, command)), stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{name} failed (exit {result.returncode}); its log:\n{log.read_text()[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@contextmanager
def smollm2_workdir(workdir: str | None) -> Iterator[Path]:
    """The benchmark's directory (`workdir`, else a temporary one) with the embedded model written in
    it as smollm2-135m/ and qsvd's cache in it, so that prepared models are made once, outside the timing."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["QSVD_CACHE"] = str(work / "cache")
        write_smollm2(work / "smollm2-135m")
        yield work


def peer_model(model_path: str, rank: int, use_dora: bool = False):
    """QLoRA (or QDoRA) built the standard PEFT way: a 4-bit NF4 base with double quantization,
    `prepare_model_for_kbit_training`, `get_peft_model(LoraConfig(r=rank, alpha=rank))`; with
    transformers' hub kernels, its default, unless the hub is offline (HF_HUB_OFFLINE=1), where
    loading them fails."""
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qsvd.devices import compute_dtype, default_device

    device = default_device()
    dtype = compute_dtype(device)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization, dtype=dtype,
                                                 device_map=device.type, use_kernels=not HF_HUB_OFFLINE)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS,
                        use_dora=use_dora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train_peer(use_dora: bool, **settings):
    """PEFT's QLoRA (or QDoRA, `use_dora`) trained by qsvd's `train` with transformers' own Trainer, on
    the run `settings` name (FinetuneConfig's: model, rank, data, seq_len, ...); the run's outcome and
    the trainable parameters."""
    from transformers import Trainer

    from qsvd.config import FinetuneConfig
    from qsvd.data import build_dataset
    from qsvd.load import load_tokenizer, resolve_model
    from qsvd.train import train

    config = FinetuneConfig.resolve(method="lora", **settings)
    tokenizer = load_tokenizer(resolve_model(config.model), False)
    dataset = build_dataset(config.data, tokenizer, config.seq_len, config.seed)
    model = peer_model(config.model, config.rank, use_dora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as work:
        return train(model, tokenizer, dataset, config, Path(work), trainer_class=Trainer), trainable
