"""Stage 4: train the adapters with transformers' Trainer (paged 8-bit AdamW, checkpointing on).

Every `save_steps` Trainer saves a checkpoint (the adapter tensors as safetensors, optimizer,
scheduler, RNG and trainer state), which `checkpoints.SealCheckpoints` seals and publishes;
`resume_from` continues from one exactly. A loss that is not finite stops training at once.
"""

import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (EarlyStoppingCallback, PreTrainedModel, PreTrainedTokenizerBase, ProgressCallback, Trainer,
                          TrainerCallback, TrainingArguments)
from transformers.integrations import TensorBoardCallback
from transformers.modeling_layers import GradientCheckpointingLayer

from .batching import (Batching, LengthGroupedSampler, attend_rows_alone, batch_collator, choose, example_lengths,
                       training_examples)
from .checkpoints import SealCheckpoints
from .config import FinetuneConfig
from .errors import Interrupted, handle_signal, raise_interrupted
from .loss import supervised_loss
from .objectives import batch_loss
from .memory import peak_memory_mb, reset_peak_memory, return_freed_memory
from .devices import compute_dtype
from .split import adapter_state

CHECKPOINT_ADAPTER = "adapter.safetensors"
BEST_ADAPTER = "best_adapter.safetensors"  # in a checkpoint, with --keep-best


@dataclass
class TrainOutcome:
    final_loss: float
    seconds: float
    step_seconds: list[float]  # wall time of each optimizer step
    first_step_start: float | None  # time.perf_counter() when the first step began (None: no step ran)
    setup_peak_memory_mb: float  # before training: load, split, quantize, any gradient estimate
    train_peak_memory_mb: float  # during training alone
    log_history: list[dict]
    best: dict | None = None  # --keep-best: {"step", "metric", "value"} of the best evaluation
    best_adapter: dict[str, torch.Tensor] | None = None  # the adapter at that evaluation

    @property
    def peak_memory_mb(self) -> float:
        return max(self.setup_peak_memory_mb, self.train_peak_memory_mb)


CHECKPOINTING = {"use_reentrant": False}


def held_out_metric(names: Sequence[str]) -> str:
    """What --early-stopping and --keep-best follow: the first --eval-data file's held-out loss, as
    Trainer names it."""
    return f"eval_{names[0]}_loss"


def training_arguments(config: FinetuneConfig, work_dir: Path, dtype: torch.dtype, batching: Batching,
                       held_out: Sequence[str] = ()) -> TrainingArguments:
    """Trainer's arguments for one process; under `accelerate launch`, for each of them.

    One process drives one device: on a host with several GPUs, Trainer would otherwise count them
    all and wrap the model in `nn.DataParallel` (it spares only models that call themselves 4- or
    8-bit), whose replicas lose bitsandbytes' quantization state. Trainer forces the same for
    model-parallel models (`self.args._n_gpu = 1`). DDP broadcasts no buffers: every process holds
    the same frozen factors and statistics, built or loaded from one prepared model, and they never
    change, so re-sending them each forward (160 MB a micro-batch at 7B) would only cost time; and
    it looks for no unused parameters, which would cost a walk of the graph every step.

    With `held_out` sets (named as Trainer's eval_dataset), Trainer scores their loss every
    --eval-steps and tracks the lowest of the first (state.best_metric, kept in checkpoints).
    """
    args = TrainingArguments(
        output_dir=str(work_dir),
        use_cpu=not torch.cuda.is_available(),  # and so gloo between processes that `accelerate launch` started
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        max_steps=config.max_steps or -1,
        num_train_epochs=config.epochs or 1.0,
        lr_scheduler_type="linear",
        warmup_steps=config.warmup_ratio,  # below 1: a fraction of the total steps
        optim=config.optim,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs=CHECKPOINTING,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to=[name for name in config.loggers if name != "tensorboard"] or "none",  # see `train`
        seed=config.seed,
        data_seed=config.seed,
        train_sampling_strategy="group_by_length" if batching.name == "grouped" else "random",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_broadcast_buffers=False,
        ddp_find_unused_parameters=False,  # every adapter takes part in every forward
        eval_strategy="steps" if held_out else "no",
        eval_steps=config.eval_steps,
        per_device_eval_batch_size=config.batch_size,
        prediction_loss_only=True,
        metric_for_best_model=held_out_metric(held_out) if held_out else None,
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,  # --early-stopping's patience
    )
    args._n_gpu = min(args.n_gpu, 1)
    return args


class InitStep(NamedTuple):
    lr: float  # η
    rule: str  # where η came from, for the console


def init_step(config: FinetuneConfig, rows: int) -> InitStep:
    """LoRA-SB's η: `--init-lr`; else the objective's own (DPO's: `DPO.init_lr`); else the learning
    rate of full fine-tuning's first step, as the official code takes it: lr / (warmup_ratio ·
    batches of the whole data at the estimate's batch size · epochs), so η does not depend on
    --max-steps (a few 1e-6 on 170k commonsense rows at batch 10; 1.2e-4 on ARC-Easy's 2,251 at
    batch 4). Without a warm-up, the full lr."""
    if config.init_lr is not None:
        return InitStep(config.init_lr, "--init-lr")
    objective = config.pair_objective
    if objective is not None and objective.init_lr is not None:
        return InitStep(objective.init_lr, f"{objective.name}'s full fine-tuning lr, to keep the start; --init-lr sets it")
    warmup = config.warmup_ratio * math.ceil(rows / config.batch_size) * (config.epochs or 1.0)
    return InitStep(config.learning_rate / max(warmup, 1.0),
                    f"--lr {config.learning_rate:g} over full fine-tuning's warm-up; --init-lr sets it")


class StepClock(TrainerCallback):
    """Times each optimizer step and adds the last one to the logged loss entries as `step_seconds`;
    `first_step_start` is when the first began (`time.perf_counter()`)."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self.first_step_start: float | None = None
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        if self.first_step_start is None:
            self.first_step_start = self._start

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.step_seconds and state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1]["step_seconds"] = round(self.step_seconds[-1], 4)


class StopOnSignal(TrainerCallback):
    """SIGINT or SIGTERM while training: the step under way finishes, a checkpoint is saved unless
    one is at most half of --save-steps old, and training stops; `signum` is the signal that came.
    A second signal stops at once (the checkpoints are written so that a kill loses none). Every
    process stops after the same step: they agree on it after each step."""

    def __init__(self):
        self.signum: int | None = None
        self.saved_step = 0

    def catch(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, raise_interrupted)

    @contextmanager
    def caught(self) -> Iterator[None]:
        """This callback takes SIGINT and SIGTERM meanwhile (in the main thread, the only one that can)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: handle_signal(signum, self.catch) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def on_train_begin(self, args, state, control, **kwargs):
        self.saved_step = state.global_step

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if not agreed(self.signum is not None, args.device):
            return
        self.signum = self.signum or signal.SIGTERM  # another process's signal
        control.should_training_stop = True
        if args.save_strategy != "no" and state.global_step - self.saved_step > args.save_steps / 2:
            control.should_save = True


def agreed(flag: bool, device: torch.device) -> bool:
    """Whether any process has `flag` set (this process's, when there is one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    votes = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
    return bool(votes.item())


class KeepBest(TrainerCallback):
    """--keep-best: the adapter at the evaluation with the lowest held-out loss, kept in memory and
    in every checkpoint after it (so that a resumed run keeps it too). Trainer tracks the lowest
    value (state.best_metric, state.best_global_step) once this evaluation's callbacks have run."""

    def __init__(self, resume_from: Path | None):
        saved = resume_from / BEST_ADAPTER if resume_from else None
        self.tensors = load_file(saved) if saved and saved.is_file() else None

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        value = (metrics or {}).get(args.metric_for_best_model)
        if value is not None and (state.best_metric is None or value < state.best_metric):
            self.tensors = {name: tensor.detach().to("cpu", copy=True) for name, tensor in adapter_state(model).items()}

    def on_save(self, args, state, control, **kwargs):
        if self.tensors is not None and args.should_save:
            save_file(self.tensors, Path(args.output_dir) / f"checkpoint-{state.global_step}" / BEST_ADAPTER,
                      metadata={"format": "pt"})


class NonFiniteLoss(Exception):
    """Training produced a NaN or infinite loss."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"the loss became {loss} at step {step}")
        self.step, self.loss = step, loss


class SupervisedTokensTrainer(Trainer):
    """Trainer whose training loss is `supervised_loss`: the same loss, with logits only where needed.

    Its checkpoints hold the adapter tensors only (the frozen base is rebuilt from the run's
    config), and it stops at the first loss that is not finite.
    """

    def create_accelerator_and_postprocess(self):
        """As Trainer's, with DDP's gradient buckets as the gradients' own storage instead of a copy
        of them; and fp16 on a CPU gets a GPU's fp16 path, autocast and loss scaling, which
        accelerate reserves for accelerators (so that the path every T4 takes runs in tests)."""
        super().create_accelerator_and_postprocess()
        self.accelerator.ddp_handler.gradient_as_bucket_view = True
        if self.args.fp16 and self.accelerator.scaler is None:
            self.accelerator.scaler = torch.amp.GradScaler(self.accelerator.device.type)
            self.accelerator.native_amp = True

    def _get_train_sampler(self, train_dataset=None):
        """Length-grouped batches in an order of --seed and the epoch alone (see `batching`), grouped
        by the global batch, which each process takes its share of: so N processes see one's order."""
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return LengthGroupedSampler(global_batch, example_lengths(dataset), self.args.data_seed)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteLoss(self.state.global_step + 1, loss.item())
        return loss

    def _save(self, output_dir=None, state_dict=None):
        if not self.args.should_save:  # the main process writes the adapter; the others hold the same
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(self.model), Path(output_dir) / CHECKPOINT_ADAPTER, metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        tensors = load_file(Path(resume_from_checkpoint) / CHECKPOINT_ADAPTER)
        missing = set(adapter_state(self.model)) - tensors.keys()
        if missing:
            raise ValueError(f"{resume_from_checkpoint} lacks adapter tensors such as {sorted(missing)[0]}")
        self.model.load_state_dict(tensors, strict=False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`batch_loss`, called as the model's forward: through DDP's forward when DDP wraps the
        model (its gradient hooks need it), and under the accelerator's autocast in one process as in
        many (accelerate puts autocast around the model's own forward, which this replaces). An
        evaluation takes the same loss, with no logits kept."""
        # normalised by the accumulated batch's token count exactly when Trainer's default would be
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        inner = self.accelerator.unwrap_model(model)

        def loss_forward(**batch):
            return self.batch_loss(inner, batch, num_items_in_batch if scaled else None)

        with forward_replaced(inner, loss_forward), self.accelerator.autocast():
            loss = model(**inputs)
        if self.args.average_tokens_across_devices and scaled:
            loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss  # an evaluation's outputs: its loss alone

    def batch_loss(self, model: nn.Module, batch: dict, num_items: torch.Tensor | None) -> torch.Tensor:
        return supervised_loss(model, batch, num_items)


class PreferenceTrainer(SupervisedTokensTrainer):
    """The trainer for a preference objective (`objectives`): each batch is B pairs as 2B rows, its
    loss the objective's mean over the pairs (which Trainer divides by --grad-accum), and the
    objective's metrics (rewards/chosen, rewards/margins, …) are logged with the loss, each the
    mean over every pair of every process since the last log, as TRL logs them."""

    def __init__(self, *args, objective, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.model_accepts_loss_kwargs = False
        self.metric_sums: dict[str, torch.Tensor] = {}  # each metric's (Σ values, count) since the last log

    def batch_loss(self, model, batch, num_items):
        loss, metrics = batch_loss(self.objective, model, batch)
        for key, values in metrics.items():
            counted = torch.stack([values.double().sum(), values.new_tensor(values.numel(), dtype=torch.float64)])
            self.metric_sums[key] = self.metric_sums.get(key, 0) + counted
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for key, summed in self.metric_sums.items():
                total, count = self.accelerator.reduce(summed, reduction="sum")
                logs[key] = round((total / count).item(), 6)
            self.metric_sums.clear()
        super().log(logs, start_time)


@contextmanager
def forward_replaced(model: nn.Module, forward) -> Iterator[None]:
    """The next `model(**batch)` calls `forward(**batch)` instead of the model's forward, which is
    back in place (with accelerate's autocast wrapper, if any) as soon as that call starts, so
    that `forward` may call the model itself (a model whose logits need its whole forward)."""
    previous = vars(model).get("forward")

    def restore():
        if previous is None:
            vars(model).pop("forward", None)
        else:
            model.forward = previous

    def once(*args, **kwargs):
        restore()
        return forward(*args, **kwargs)

    model.forward = once
    try:
        yield
    finally:
        restore()


@contextmanager
def tf32_matmuls(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """fp32 training on a GPU multiplies in TF32 (Ampere and newer; older GPUs ignore the flag), as
    Trainer's `tf32` would, which refuses to run on those; only while training, so that a split
    or an evaluation in the same process keeps full fp32."""
    if device.type != "cuda" or dtype != torch.float32:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@contextmanager
def freed_after_each_block(model: PreTrainedModel):
    """On a CPU, hand the freed heap back to the OS after the forward of each decoder block and of
    the output head (each chunk of logits), and again before their backward.

    glibc keeps freed buffers otherwise and serves later ones from fresh pages: 5.4 GB beside 1.1 GB
    of live tensors at SmolLM2-135M batch 8 × 512 (trimmed: 1.6 GB in all), and on a 7B model 2 GB
    over a forward that gradient checkpointing meant to keep small. Trimmed, the heap holds no more
    than one block's or one chunk's buffers beyond the live tensors, which `qsvd plan` counts. The
    page faults that follow cost a third of a step at SmolLM2's width (576), less at wider ones."""
    modules = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    modules.append(model.get_output_embeddings())

    def trim_now_and_before_backward(module, inputs, output):
        return_freed_memory()
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(hidden) and hidden.requires_grad:
            hidden.register_hook(lambda grad: return_freed_memory())

    hooks = [module.register_forward_hook(trim_now_and_before_backward)
             for module in (modules if model.device.type == "cpu" else []) if module is not None]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: datasets.Dataset,
          config: FinetuneConfig, work_dir: Path, checkpoints: Path | None = None, resume_from: Path | None = None,
          trainer_class: type[Trainer] = SupervisedTokensTrainer, logs: Path | None = None,
          callbacks: Sequence[TrainerCallback] = (), batching: Batching | None = None,
          held_out: dict[str, datasets.Dataset] | None = None) -> TrainOutcome:
    """Run Trainer over `dataset`'s rows in batches made by `batching` (default: as --batching picks
    for this device), with `callbacks` besides qsvd's own; Trainer shows the progress bar and logs
    the loss, also to the --report-to integrations (tensorboard's event files into `logs`, else into
    `work_dir`). Every --eval-steps it scores each `held_out` set's loss (--early-stopping and
    --keep-best follow the first).

    Checkpoints are staged in `work_dir` and published, sealed, in `checkpoints`.
    """
    spec = getattr(model, "qsvd_spec", None)  # None for a model built elsewhere (PEFT's, in the benchmarks): auto
    dtype = compute_dtype(model.device, spec)
    batching = batching or choose(config.batching, model.device, dtype, model.config._attn_implementation)
    attend_rows_alone(model, batching, dtype)
    args = training_arguments(config, work_dir, dtype, batching, list(held_out or ()))
    clock = StepClock()
    stop = StopOnSignal()
    keep_best = KeepBest(resume_from) if config.keep_best else None
    callbacks = [clock, stop, *callbacks, *([keep_best] if keep_best else []),
                 *([EarlyStoppingCallback(config.early_stopping)] if config.early_stopping else []),
                 *([SealCheckpoints(checkpoints)] if checkpoints is not None else [])]
    if "tensorboard" in config.loggers:  # Trainer's own callback, writing where the run keeps its logs
        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(logs or work_dir / "logs")
        callbacks.append(tensorboard)
    examples = training_examples(dataset, batching, config.seq_len)
    objective = config.pair_objective
    if objective is not None:
        trainer_class = partial(PreferenceTrainer, objective=objective)
    trainer = trainer_class(model=model, args=args, train_dataset=examples, eval_dataset=held_out or None,
                            data_collator=batch_collator(tokenizer, batching, pairs=objective is not None),
                            processing_class=tokenizer, callbacks=callbacks)
    setup_peak = peak_memory_mb(model.device)
    return_freed_memory(collect=True)  # what setup left behind, so the training peak is training's own
    reset_peak_memory(model.device)
    start = time.perf_counter()
    try:
        with freed_after_each_block(model), tf32_matmuls(model.device, dtype), stop.caught():
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if stop.signum is not None:
            raise Interrupted(stop.signum, f"interrupted by {signal.Signals(stop.signum).name} at step "
                                           f"{trainer.state.global_step}")
    except BaseException:
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()  # so that the error is told on a line of its own
        raise
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    state = trainer.state
    best = ({"step": state.best_global_step, "metric": args.metric_for_best_model, "value": state.best_metric}
            if keep_best and keep_best.tensors is not None else None)
    return TrainOutcome(final_loss=losses[-1] if losses else float("nan"), seconds=seconds,
                        step_seconds=clock.step_seconds, first_step_start=clock.first_step_start, setup_peak_memory_mb=setup_peak,
                        train_peak_memory_mb=peak_memory_mb(model.device), log_history=history, best=best,
                        best_adapter=keep_best.tensors if best else None)
