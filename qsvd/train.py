"""Stage 4: train the adapters with transformers' Trainer (paged 8-bit AdamW, checkpointing on)."""

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from .config import FinetuneConfig
from .data import IGNORE_INDEX, collator
from .split import compute_dtype


@dataclass
class TrainOutcome:
    final_loss: float
    seconds: float
    step_seconds: list[float]  # wall time of each optimizer step
    setup_peak_memory_mb: float  # before training: load, split, quantize, any gradient estimate
    train_peak_memory_mb: float  # during training alone
    log_history: list[dict]

    @property
    def peak_memory_mb(self) -> float:
        return max(self.setup_peak_memory_mb, self.train_peak_memory_mb)


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


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: torch's allocator statistics on CUDA; VmHWM via /proc/self/clear_refs on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass  # elsewhere the peak stays the process's


class StepClock(TrainerCallback):
    """Times each optimizer step and adds the last one to the logged loss entries as `step_seconds`."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.step_seconds and state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1]["step_seconds"] = round(self.step_seconds[-1], 4)


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


def supervised_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor],
                    num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The causal-LM loss, Σ CE(lm_head(h_t), y_{t+1}) / N, with vocabulary logits computed only
    at the positions whose next token carries loss (not at prompt or padding tokens).

    The logits are the largest tensors of a step (tokens × vocab); the model's own loss computes
    them everywhere. N is `num_items` (the accumulated batch's count, as Trainer passes it) or
    this batch's count of supervised tokens.
    """
    hidden = model.get_decoder()(input_ids=inputs["input_ids"],
                                 attention_mask=inputs.get("attention_mask")).last_hidden_state
    targets = inputs["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][supervised]).float()
    loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
    return loss / (num_items if num_items is not None else supervised.sum().clamp_min(1))


def plain_logits(model: PreTrainedModel) -> bool:
    """Whether the model's logits are lm_head(hidden) with nothing after (no soft-capping or scaling)."""
    config = model.config
    return (model.get_output_embeddings() is not None and
            not any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")))


class SupervisedTokensTrainer(Trainer):
    """Trainer whose training loss is `supervised_loss`: the same loss, with logits only where needed."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or self.accelerator.unwrap_model(model) is not model or not plain_logits(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # normalised by the accumulated batch's token count exactly when Trainer's default would be
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = supervised_loss(model, inputs, num_items_in_batch if scaled else None)
        if self.args.average_tokens_across_devices and scaled:
            loss = loss * self.accelerator.num_processes
        return loss


def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset,
          config: FinetuneConfig, work_dir: Path,
          trainer_class: type[Trainer] = SupervisedTokensTrainer) -> TrainOutcome:
    """Run Trainer over `dataset`; Trainer shows the progress bar and logs the loss."""
    args = training_arguments(config, work_dir, compute_dtype(model.device))
    clock = StepClock()
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator(tokenizer),
                            processing_class=tokenizer, callbacks=[clock])
    setup_peak = peak_memory_mb(model.device)
    reset_peak_memory(model.device)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return TrainOutcome(final_loss=losses[-1] if losses else float("nan"), seconds=seconds,
                        step_seconds=clock.step_seconds, setup_peak_memory_mb=setup_peak,
                        train_peak_memory_mb=peak_memory_mb(model.device), log_history=history)
