"""Stage 4: train the adapters with transformers' Trainer (paged 8-bit AdamW, checkpointing on)."""

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from .config import FinetuneConfig
from .data import collator
from .split import compute_dtype


@dataclass
class TrainOutcome:
    final_loss: float
    seconds: float
    peak_memory_mb: float
    log_history: list[dict]


def training_arguments(config: FinetuneConfig, work_dir: Path, dtype: torch.dtype) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps or -1,
        num_train_epochs=config.epochs or 1.0,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,  # below 1: a fraction of the total steps
        optim=config.optim,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=config.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def first_step_lr(config: FinetuneConfig, rows: int) -> float:
    """η of the first optimizer step that moves the weights under the linear warmup schedule."""
    args = training_arguments(config, Path("unused"), torch.float32)
    steps_per_epoch = math.ceil(rows / (config.batch_size * config.grad_accum))
    total = config.max_steps or math.ceil(steps_per_epoch * (config.epochs or 1.0))
    warmup = args.get_warmup_steps(total)
    return config.learning_rate / warmup if warmup else config.learning_rate


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA; the process's peak RSS on CPU.

    On Linux the peak RSS is VmHWM: getrusage's ru_maxrss survives fork + exec, so a child of
    a big process would report its parent's peak.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset,
          config: FinetuneConfig, work_dir: Path) -> TrainOutcome:
    """Run Trainer over `dataset`; Trainer shows the progress bar and logs the loss."""
    args = training_arguments(config, work_dir, compute_dtype(model.device))
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=collator(tokenizer), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return TrainOutcome(final_loss=losses[-1] if losses else float("nan"), seconds=seconds,
                        peak_memory_mb=peak_memory_mb(model.device), log_history=history)
