"""The fine-tuning recipe, top to bottom: load → split + quantize → train → export."""

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import set_seed

from .config import FinetuneConfig
from .console import console
from .data import build_dataset, first_batches
from .evaluate import eval_sets, evaluate_model
from .load import load_tokenizer, resolve_model
from .methods import METHODS
from .methods.lorasb import init_from_gradients
from .prepared import build_to_disk, lookup, obtain
from .run import check_output, publish, write_run
from .split import adapter_layers, default_device
from .train import CHECKPOINTING, first_step_lr, train



@dataclass
class RunSummary:
    model: nn.Module  # the trained model, ready for inference
    output: Path
    trainable_params: int
    final_loss: float
    seconds: float
    peak_memory_mb: float

    def line(self) -> str:
        return (f"trainable params: {self.trainable_params:,} | final loss: {self.final_loss:.4f} | "
                f"wall time: {self.seconds:.1f} s | peak memory: {self.peak_memory_mb:,.0f} MB | "
                f"saved to {self.output}")


def init(config: FinetuneConfig | None = None, **options) -> Path:
    """Split and quantize only, as `qsvd init` does; returns the prepared model's directory."""
    config = config or FinetuneConfig.resolve(**options)
    set_seed(config.seed)
    files = resolve_model(config.model)
    device = default_device()
    found = lookup(files, config.spec(), config.targets, config.seed, device, config.trust_remote_code)
    if found.problem is None:
        console.print(f"already prepared: {found.path}")
    else:
        build_to_disk(found, files, config.spec(), device)
    return found.path


def finetune(config: FinetuneConfig | None = None, **options) -> RunSummary:
    """Fine-tune as `qsvd finetune` does; `options` are the CLI's, by their Python names."""
    start = time.perf_counter()
    config = config or FinetuneConfig.resolve(**options)
    output = config.output_dir
    check_output(output, config.overwrite)
    set_seed(config.seed)

    # 1. load: the model's files and tokenizer, and the data (the weights are read in step 2)
    files = resolve_model(config.model)
    tokenizer = load_tokenizer(files, config.trust_remote_code)
    dataset = build_dataset(config.data, tokenizer, config.seq_len, config.seed)
    evaluations = eval_sets(config.eval_data or [], config.eval_task)
    console.print(f"{len(dataset)} training rows; method {config.method}, {config.bits}-bit frozen base, "
                  f"rank {config.rank}, lr {config.learning_rate:g}")

    # 2-3. split each target layer as it is read and quantize its frozen part, or reuse that work
    model, prepared = obtain(files, config.spec(), config.targets, config.seed,
                             trust_remote_code=config.trust_remote_code)
    if METHODS[config.method].needs_gradient_init:
        if config.gradient_checkpointing:  # the estimate's backward passes recompute, as training's do
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
        batches = first_batches(dataset, tokenizer, config.gradient_samples, config.batch_size, config.seed)
        init_from_gradients(model, adapter_layers(model), batches, first_step_lr(config, len(dataset)),
                            config.grad_budget_bytes, config.grad_sketch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # 4-5. train in a staging directory, then publish the finished run in one rename
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        outcome = train(model, tokenizer, dataset, config, stage / "trainer")
        record = {"config": config.resolved(), "model_path": str(files.config_dir),
                  "model_fingerprint": files.fingerprint, "prepared_model": str(prepared),
                  "trainable_params": trainable,
                  "final_loss": outcome.final_loss, "train_seconds": outcome.seconds,
                  "median_step_seconds": statistics.median(outcome.step_seconds or [float("nan")]),
                  "setup_peak_memory_mb": outcome.setup_peak_memory_mb,
                  "train_peak_memory_mb": outcome.train_peak_memory_mb,
                  "peak_memory_mb": outcome.peak_memory_mb}
        shutil.rmtree(stage / "trainer", ignore_errors=True)
        record["eval"] = {}
        for path, rows, task in evaluations:
            predictions = f"eval-{path.stem}-{task}.jsonl"
            result = evaluate_model(model, tokenizer, rows, task, stage / predictions, source=f"--eval-data {path}")
            console.print(f"{path.name}: {result.line().rsplit(' | ', 1)[0]}")
            record["eval"][path.stem] = result.summary() | {"predictions": predictions}
        write_run(stage, model, record, outcome.log_history)
        publish(stage, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    summary = RunSummary(model, output, trainable, outcome.final_loss, time.perf_counter() - start,
                         outcome.peak_memory_mb)
    console.print(summary.line())
    return summary
