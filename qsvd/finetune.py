"""The fine-tuning recipe, top to bottom: load → split + quantize → train → export."""

import shlex
import shutil
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase, set_seed

from .checkpoints import CHECKPOINTS, newest_intact, resume_point, start_work_dir, step_of, work_dir
from .config import FinetuneConfig
from .console import console
from .batching import Batching, attend_rows_alone, batch_collator, choose
from .data import PAIR_FIELDS, TrainingRows, eval_sets, first_batches, held_out_rows, tokenize_rows, training_rows
from .devices import compute_dtype, default_device
from .distributed import processes
from .errors import Interrupted, QSVDError, first_line, is_disk_full, out_of_memory_advice
from .evaluate import evaluate_model
from .files import one_writer, publish, remove
from .load import ModelFiles, empty_model, load_tokenizer, resolve_model
from .loss import supervised_loss
from .methods import METHODS
from .objectives import reference_log_likelihoods, run_objective, start_loss, trainable_tensors, with_reference
from .prepared import find_prepared, load_or_split, split_to_disk
from .run_dir import LOGS, REFERENCE_FILE, write_run
from .split import adapter_layers, find_targets
from .train import CHECKPOINTING, NonFiniteLoss, init_step, train


@dataclass
class RunSummary:
    model: nn.Module  # the trained model, ready for inference
    output: Path
    trainable_params: int
    final_loss: float
    seconds: float
    setup_seconds: float  # from the start to the first training step: load, split or reuse, tokenize
    peak_memory_mb: float

    def line(self) -> str:
        return (f"trainable params: {self.trainable_params:,} | final loss: {self.final_loss:.4f} | "
                f"wall time: {self.seconds:.1f} s (setup {self.setup_seconds:.1f} s) | "
                f"peak memory: {self.peak_memory_mb:,.0f} MB | saved to {self.output}")


def init(config: FinetuneConfig | None = None, **options) -> Path:
    """Split and quantize only, as `qsvd init` does; returns the prepared model's directory."""
    config = config or FinetuneConfig.resolve(**options)
    set_seed(config.seed)
    files, _ = model_files(config)
    device = default_device()
    path = find_prepared(files, config.spec(), config.targets, config.seed, device, config.trust_remote_code).path
    with one_writer(path, wait=True, what="the prepared model"):  # another process may be preparing it
        found = find_prepared(files, config.spec(), config.targets, config.seed, device, config.trust_remote_code,
                              checksums=True)
        if found.problem is None:
            console.print(f"already prepared: {found.path}")
        else:
            split_to_disk(found, files, config.spec(), device)
    return found.path


def finetune(config: FinetuneConfig | None = None, **options) -> RunSummary:
    """Fine-tune as `qsvd finetune` does; `options` are the CLI's, by their Python names.

    Under `accelerate launch` every process runs this; see `distributed` for who does what.
    """
    start = time.perf_counter()
    config = config or FinetuneConfig.resolve(**options)
    state = processes()
    with one_writer(config.output_dir, wait=False) if state.is_main_process else nullcontext():
        return recipe(config, state, start)


def recipe(config: FinetuneConfig, state, start: float) -> RunSummary:
    """`finetune`'s steps, with --output held by the main process, its one writer."""
    output = config.output_dir
    set_seed(config.seed)

    # 1. load: check the inputs, the tokenizer among them (the main process first: it may fetch or
    #    convert the model; the weights are read in step 2), then tokenize the rows
    with state.main_process_first():
        resume_from, training, evaluations, files, tokenizer = check_inputs(config)
    tokenized = tokenize_rows(training, tokenizer, config.seq_len, config.truncate)
    dataset = tokenized.rows
    held_out = held_out_sets(evaluations, tokenizer, config) if config.eval_steps else None
    console.print(f"{tokenized.line()}; method {config.method}, {config.bits}-bit frozen base, "
                  f"rank {config.rank}, lr {config.learning_rate:g}")

    # 2-3. split each target layer as it is read and quantize its frozen part, or reuse that work
    #    (by the main process; the others wait, then load what it prepared)
    with (out_of_memory_advice("splitting and quantizing the model", "a smaller --rank, --svd-niter 2, or fewer --targets"),
          state.main_process_first()):
        model, prepared = load_or_split(files, config.spec(), config.targets, config.seed,
                                        trust_remote_code=config.trust_remote_code)
    batching = choose(config.batching, model.device, compute_dtype(model.device, config.spec()),
                      model.config._attn_implementation)
    console.print(batching.line())
    if METHODS[config.method].needs_gradient_init and resume_from is None:  # a checkpoint holds the init
        init_from_gradients(model, dataset, tokenizer, config, batching)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # 4. train, checkpointing into the work dir beside --output (DPO's reference first: see
    #    `dpo_reference`); 5. publish the run in one rename (by the main process; the others wait
    #    until it is published)
    work = start_work_dir(config, output) if state.is_main_process else work_dir(output)
    try:
        reference_adapter = None
        if config.pair_objective is not None and config.pair_objective.needs_reference:
            with state.main_process_first():
                dataset, reference_adapter = dpo_reference(model, dataset, tokenizer, config, batching, work)
        outcome = train_with_advice(model, tokenizer, dataset, config, work, resume_from, batching, held_out)
        if outcome.best is not None:  # --keep-best
            model.load_state_dict(outcome.best_adapter, strict=False)
            console.print(f"keeping the adapter of step {outcome.best['step']} ({outcome.best['metric']} "
                          f"{outcome.best['value']:.4f})")
        setup_seconds = (outcome.first_step_start or time.perf_counter()) - start
        if state.is_main_process:
            record = {"config": config.resolved(), "batching": batching.name, "processes": state.num_processes,
                      "model_path": str(files.config_dir),
                      "model_fingerprint": files.fingerprint, "prepared_model": str(prepared),
                      "trainable_params": trainable,
                      "data": {"rows": tokenized.read, "kept": len(dataset), "skipped": tokenized.skipped},
                      "final_loss": outcome.final_loss, "setup_seconds": setup_seconds,
                      "train_seconds": outcome.seconds,
                      "median_step_seconds": statistics.median(outcome.step_seconds or [float("nan")]),
                      "setup_peak_memory_mb": outcome.setup_peak_memory_mb,
                      "train_peak_memory_mb": outcome.train_peak_memory_mb,
                      "peak_memory_mb": outcome.peak_memory_mb, "best": outcome.best, "eval": {}}
            publish(output, lambda stage: write_run_files(stage, model, tokenizer, evaluations, record, outcome, work,
                                                          reference_adapter))
            remove(work)
        state.wait_for_everyone()
    finally:
        if state.is_main_process and work.is_dir() and newest_intact(work / CHECKPOINTS) is None:
            remove(work)  # nothing to resume from
    summary = RunSummary(model, output, trainable, outcome.final_loss, time.perf_counter() - start,
                         setup_seconds, outcome.peak_memory_mb)
    console.print(summary.line())  # by the main process: the others print nothing
    return summary


def write_run_files(stage: Path, model: nn.Module, tokenizer, evaluations: list, record: dict, outcome,
                    work: Path, reference_adapter: dict | None) -> None:
    """The run's files, into its temporary directory `stage`: each --eval-data score and predictions,
    the --report-to tensorboard event files (a copy: the work dir keeps them until the run is
    published) and the run directory's own files."""
    output = record["config"]["output"]
    objective = run_objective(record["config"])
    for path, rows, task in evaluations:
        predictions = f"eval-{path.stem}-{task}.jsonl"
        with out_of_memory_advice(f"evaluating on {path}", f"evaluate later with `qsvd eval {output} "
                                  f"--data {path} --batch-size 1`"):
            result = evaluate_model(model, tokenizer, rows, task, stage / predictions, source=f"--eval-data {path}",
                                    objective=objective, reference_adapter=reference_adapter)
        console.print(f"{path.name}: {result.line().rsplit(' | ', 1)[0]}")
        record["eval"][path.stem] = result.summary() | {"predictions": predictions}
    if (work / LOGS).is_dir():
        shutil.copytree(work / LOGS, stage / LOGS)
    write_run(stage, model, record, outcome.log_history, reference_adapter)


def dpo_reference(model: nn.Module, dataset: datasets.Dataset, tokenizer, config: FinetuneConfig, batching: Batching,
                  work: Path) -> tuple[datasets.Dataset, dict[str, torch.Tensor]]:
    """DPO's reference, the model as training starts, without a second model: π_ref of every pair,
    computed once with the starting adapter, and that adapter's trainable tensors (which the run
    keeps, for `qsvd eval`). Both are kept in the work dir, so that a resumed run (whose model
    holds the trained adapter) and every other process reuse them. Returns the pairs with their
    π_ref, and the tensors."""
    path = work / REFERENCE_FILE
    if path.is_file():  # a resumed run's, or the main process's for the others
        saved = saved_reference(path, len(dataset))
    else:
        dtype = compute_dtype(model.device, config.spec())
        attend_rows_alone(model, batching, dtype)
        collate = batch_collator(tokenizer, batching, pairs=True)
        with out_of_memory_advice("computing dpo's reference log-likelihoods", "a smaller --batch-size"):
            saved = reference_log_likelihoods(model, dataset, collate, config.batch_size,
                                              None if dtype == torch.float32 else dtype)
        saved |= {f"adapter.{name}": tensor for name, tensor in trainable_tensors(model).items()}
        publish(path, lambda tmp: save_file(saved, tmp), directory=False)
    adapter = {name.removeprefix("adapter."): t for name, t in saved.items() if name.startswith("adapter.")}
    return with_reference(dataset, {side: saved[side] for side in PAIR_FIELDS}), adapter


def saved_reference(path: Path, pairs: int) -> dict[str, torch.Tensor]:
    """The work dir's reference file, checked to hold π_ref of `pairs` pairs."""
    try:
        saved = load_file(path)
        held = {len(saved[side]) for side in PAIR_FIELDS}
    except (SafetensorError, OSError, KeyError) as error:
        raise QSVDError(f"{path} is not a readable reference file ({first_line(error)}); start over with "
                        f"--overwrite") from None
    if held != {pairs}:
        raise QSVDError(f"{path} holds the reference of {min(held)} pairs, not of the {pairs} training pairs; "
                        f"start over with --overwrite")
    return saved


def init_from_gradients(model: nn.Module, dataset, tokenizer, config: FinetuneConfig, batching: Batching) -> None:
    """The adapters of a method set from gradients (LoRA-SB's factors), from the gradients of the
    objective's loss on the first --grad-samples rows or pairs (in batches of --batch-size, flattened
    as training's are when `batching` flattens them), at η = `init_step`'s."""
    if config.gradient_checkpointing:  # the estimate's backward passes recompute, as training's do
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING)
    attend_rows_alone(model, batching, compute_dtype(model.device, config.spec()))
    objective = config.pair_objective  # a preference objective's gradient at the start, from pairs
    loss = supervised_loss if objective is None else partial(start_loss, objective)
    batches = first_batches(dataset, batch_collator(tokenizer, batching, pairs=objective is not None),
                            config.gradient_samples, config.batch_size, config.seed)
    lr, rule = init_step(config, len(dataset))
    console.print(f"{config.method}: init step η = {lr:.3g} ({rule})")
    with out_of_memory_advice(f"estimating {config.method}'s gradients", "--grad-mem-budget 1GB, --grad-sketch, "
                              "or fewer --grad-samples"):
        METHODS[config.method].init_from_gradients(model, adapter_layers(model), batches, lr, config.grad_budget_bytes,
                                                   config.grad_sketch, loss)


class Inputs(NamedTuple):
    resume_from: Path | None  # the checkpoint to continue from
    training: TrainingRows
    evaluations: list  # (path, rows, task) of each --eval-data file
    files: ModelFiles
    tokenizer: PreTrainedTokenizerBase


def check_inputs(config: FinetuneConfig) -> Inputs:
    """What a run checks before any heavy work, cheapest first: the compute dtype against the GPU,
    --output against --resume and --overwrite, the data, the eval files, then the model's files
    (fetched or converted once)."""
    compute_dtype(default_device(), config.spec())
    resume_from = resume_point(config, config.output_dir)
    training = training_rows(config.data, config.seed, config=config.data_config, split=config.data_split,
                             prompt_field=config.prompt_field, response_field=config.response_field,
                             max_rows=config.max_rows, objective=config.objective)
    return Inputs(resume_from, training, eval_sets(config.eval_data or [], config.eval_task, config.eval_split),
                  *model_files(config))


def model_files(config: FinetuneConfig) -> tuple[ModelFiles, PreTrainedTokenizerBase]:
    """The model's files and tokenizer, with what can be checked before any weight is read: its
    config, its architecture (adaptable linear layers) and its tokenizer."""
    files = resolve_model(config.model, config.revision)
    find_targets(empty_model(files, config.trust_remote_code))
    return files, load_tokenizer(files, config.trust_remote_code)


def held_out_sets(evaluations: list, tokenizer, config: FinetuneConfig) -> dict[str, datasets.Dataset]:
    """--eval-steps: the first --eval-rows rows of each --eval-data file, tokenized for their loss,
    by the file's name (its stem, numbered when two files share one)."""
    sets = {}
    for path, rows, _ in evaluations:
        name = path.stem if path.stem not in sets else f"{path.stem}-{len(sets) + 1}"
        sets[name] = held_out_rows(rows, f"--eval-data {path}", tokenizer, config.seq_len, config.eval_rows)
        if len(sets[name]) == 0:
            raise QSVDError(f"--eval-data {path} has no row to score a held-out loss on")
    return sets


def train_with_advice(model: nn.Module, tokenizer, dataset, config: FinetuneConfig, work: Path,
                      resume_from: Path | None, batching: Batching, held_out: dict | None):
    """`train`, with a diverged loss or running out of memory told as what to do next."""
    advice = (f"start over (--overwrite) with --batch-size {max(1, config.batch_size // 2)} --grad-accum "
              f"{config.grad_accum * 2} (the same effective batch), a shorter --seq-len, or --bits 4")
    try:
        with out_of_memory_advice("training", advice):
            return train(model, tokenizer, dataset, config, work / "trainer", work / CHECKPOINTS, resume_from,
                         logs=work / LOGS, batching=batching, held_out=held_out)
    except NonFiniteLoss as error:
        raise QSVDError(f"training stopped: {error} (lr {config.learning_rate:g}); "
                        f"{continuation(work, 'a lower --lr')}") from None
    except Interrupted as interrupted:
        newest = newest_intact(work / CHECKPOINTS)
        kept = (f"the checkpoint of step {step_of(newest)} is kept in {work / CHECKPOINTS}: continue with "
                f"{resume_command()}" if newest else "no checkpoint was saved yet: start again with --overwrite")
        raise Interrupted(interrupted.signum, f"{interrupted}; {kept}") from None
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise QSVDError(f"the disk is full: {first_line(error)}; free some space, then {continuation(work, 'more space')}") from None


def resume_command() -> str:
    """The command that continues this run: the one that started it, with --resume."""
    if Path(sys.argv[0]).name not in ("qsvd", "__main__.py"):
        return "the same call and resume=True"
    return "qsvd " + shlex.join([arg for arg in sys.argv[1:] if arg != "--resume"] + ["--resume"])


def continuation(work: Path, remedy: str) -> str:
    """How to go on from the newest complete checkpoint in `work`, or to start over with `remedy`."""
    newest = newest_intact(work / CHECKPOINTS)
    if newest is None:
        return f"no checkpoint was saved before it; start over with {remedy} and --overwrite"
    return (f"the last good checkpoint is step {step_of(newest)} in {work / CHECKPOINTS}: continue with the same "
            f"command and --resume, or start over with {remedy} and --overwrite")
