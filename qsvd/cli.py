"""The `qsvd` command line. Every user error is one line on stderr and exit code 2."""

import inspect
import signal
import sys
from contextlib import contextmanager

import click
import yaml

from .batching import BATCHINGS
from .config import TASK_TYPES, FinetuneConfig
from .chat import chat as run_chat
from .data import EVAL_TASKS
from .devices import COMPUTE_DTYPES, DTYPES
from .distributed import launched, relaunch, without_option
from .errors import Interrupted, QSVDError, first_line, handle_signal, is_disk_full, raise_interrupted
from .evaluate import evaluate as run_evaluate
from .export import BASES, FORMATS
from .export import export as run_export
from .export_gguf import EXPORT_TYPES
from .files import one_writer
from .finetune import check_inputs
from .finetune import finetune as run_finetune
from .finetune import init as run_init
from .load import ALIASES
from .objectives import DPO_BETA, OBJECTIVES, ORPO_LAMBDA
from .methods import METHODS, methods_that
from .plan import GPUS
from .plan import plan as run_plan


def defaults_of(function) -> dict:
    """A function's keyword defaults: those of `qsvd eval` and `qsvd export` are their API's."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items() if p.default is not p.empty}


DEFAULT = FinetuneConfig()  # `finetune`, `init` and `plan`: every default the help names is this one's
EVAL_DEFAULT, EXPORT_DEFAULT, CHAT_DEFAULT = defaults_of(run_evaluate), defaults_of(run_export), defaults_of(run_chat)
MODEL_HELP = (f"A hub id ORG/NAME, an alias ({', '.join(ALIASES)}; default {DEFAULT.model}), a local HF directory "
              f"with safetensors, or a .gguf file.")
REVISION_HELP = "A hub model's branch, tag or commit (default: main)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """qsvd: SVD-initialised adapters on a 4-bit frozen base."""
    ctx.obj = {"debug": debug}


def split_options(command):
    """The options that define the split: shared by `finetune` and `init`."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of options; flags override it."),
        click.option("--model", help=MODEL_HELP),
        click.option("--revision", help=REVISION_HELP),
        click.option("--method", type=click.Choice(list(METHODS)), help=f"Adapter method (default {DEFAULT.method})."),
        click.option("--bits", type=int, help=f"Frozen storage: 4 (NF4), 8 (int8) or 16 (compute dtype) (default {DEFAULT.bits})."),
        click.option("--rank", type=int, help=f"Adapter rank r (default {DEFAULT.rank})."),
        click.option("--alpha", type=float, help="Adapter alpha; s = alpha / r (default: alpha = r)."),
        click.option("--targets", help="Comma-separated layer names, e.g. q_proj,v_proj (default: all linear layers of the decoder blocks)."),
        click.option("--refine-iters", type=int, help=f"{methods_that('refines')}: quantization-aware refinement iterations (default {DEFAULT.refine_iters})."),
        click.option("--svd-niter", type=int, help=f"Top-r SVD ({methods_that('uses_top_svd')}): randomized, with this many power iterations (default: exact)."),
        click.option("--dtype", type=click.Choice(COMPUTE_DTYPES),
                     help=f"Compute dtype (default {DEFAULT.dtype}: fp32 on a CPU; on a GPU bf16 from compute capability 8.0, "
                          "else fp16 with loss scaling)."),
        click.option("--seed", type=int, help=f"Random seed (default {DEFAULT.seed})."),
        click.option("--trust-remote-code", is_flag=True, default=None, help="Run the model repository's own Python code (off unless given)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@split_options
@click.option("--objective", type=click.Choice(OBJECTIVES),
              help=f"sft: the responses' likelihood; dpo or orpo: preference tuning on chosen/rejected pairs, "
                   f"dpo against the starting model, computed once (default {DEFAULT.objective}).")
@click.option("--beta", type=float, help=f"dpo's β; orpo's reward scale β (default {DPO_BETA}).")
@click.option("--orpo-lambda", type=float, help=f"orpo's λ, the weight of its odds-ratio term (default {ORPO_LAMBDA}).")
@click.option("--data", help="A json, jsonl, csv or parquet file, a save_to_disk directory or a hub dataset id; rows of "
                             "instruction/output, question/answer, messages, conversations or text; for dpo and orpo, "
                             "prompt/chosen/rejected (strings or messages), or chosen/rejected conversations or HH "
                             "transcripts (default: built-in arithmetic problems).")
@click.option("--data-config", help="A hub dataset's configuration.")
@click.option("--data-split", help="A hub dataset's (or saved DatasetDict's) split (default train).")
@click.option("--prompt-field", help="The rows' prompt field, for a layout of their own (with --response-field).")
@click.option("--response-field", help="The rows' response field, for a layout of their own (with --prompt-field).")
@click.option("--max-rows", type=int, help="Train on the first N rows only.")
@click.option("--truncate", is_flag=True, default=None, help="Cut the response of a row longer than --seq-len instead of skipping the row.")
@click.option("--max-steps", type=int, help="Optimizer steps (instead of --epochs).")
@click.option("--epochs", type=float, help="Epochs over the data (default 1 when --max-steps is not given).")
@click.option("--lr", type=float, help="Learning rate (default: the method's own).")
@click.option("--batch-size", type=int, help=f"Rows per device batch (default {DEFAULT.batch_size}).")
@click.option("--grad-accum", type=int, help=f"Gradient accumulation steps (default {DEFAULT.grad_accum}).")
@click.option("--seq-len", type=int, help=f"Longest row in tokens; longer rows are skipped and counted, or cut with --truncate (default {DEFAULT.seq_len}).")
@click.option("--batching", type=click.Choice(BATCHINGS),
              help=f"How rows become batches: padded, grouped (rows of similar length together), padding-free (a "
                   f"batch's rows as one sequence) or packed; auto: padding-free where flash-attention runs, else "
                   f"grouped (default {DEFAULT.batching}).")
@click.option("--packing", is_flag=True, default=None,
              help="--batching packed: whole rows packed best-fit decreasing into sequences of --seq-len tokens.")
@click.option("--task-type", type=click.Choice(TASK_TYPES), help=f"lorasb: sets the default --grad-samples, 50 or 170 as in the paper (default {DEFAULT.task_type}).")
@click.option("--grad-samples", type=int, help="lorasb: training rows for the gradient estimate (default: by --task-type).")
@click.option("--grad-mem-budget", help="lorasb: memory for the gradients of one group of layers, e.g. 2GB; the estimate runs once per group (default: half the free memory).")
@click.option("--grad-sketch", is_flag=True, default=None, help="lorasb: one pass over all layers with a rank-(2r+1) sketch of each gradient instead of groups (approximate, little memory).")
@click.option("--init-lr", type=float, help="lorasb: η of the init step −η·sign(G) (default: --lr over full fine-tuning's warm-up steps, counted over the whole data at --batch-size, as the official code does; with --objective dpo, 1e-6, full fine-tuning's DPO lr, which keeps the start, DPO's reference).")
@click.option("--eval-data", multiple=True, help="Evaluate the trained model on this file at the end (repeatable); see `qsvd eval`.")
@click.option("--eval-task", type=click.Choice(EVAL_TASKS), help="Task for --eval-data (default: chosen by the data, as `qsvd eval` does).")
@click.option("--eval-split", help="The split of a hub dataset (or saved DatasetDict) in --eval-data (default test).")
@click.option("--eval-steps", type=int, help="Also score each --eval-data file's held-out loss (answer NLL, or "
                                             "perplexity's for text) every N steps, into the log and loss.png.")
@click.option("--eval-rows", type=int, help=f"Rows of each --eval-data file that --eval-steps scores (default {DEFAULT.eval_rows}).")
@click.option("--early-stopping", type=int, help="Stop after N --eval-steps evaluations without a lower held-out loss "
                                                 "(of the first --eval-data file).")
@click.option("--keep-best", is_flag=True, default=None, help="Publish the adapter of the --eval-steps evaluation with the "
                                                              "lowest held-out loss (of the first --eval-data file).")
@click.option("--report-to", help="Log to tensorboard, wandb, trackio or mlflow (comma-separated), through Trainer's "
                                  "own integrations; tensorboard logs go to the run's logs/ (default none).")
@click.option("--save-steps", type=int, help=f"Save a checkpoint every N steps, beside --output until the run finishes (default {DEFAULT.save_steps}).")
@click.option("--resume", is_flag=True, default=None, help="Continue the interrupted run in --output from its newest complete checkpoint.")
@click.option("--output", help="Run directory (default runs/<method>).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing run (finished or interrupted) in --output.")
@click.option("--num-processes", type=click.IntRange(min=1), default=1,
              help="Data-parallel processes, one per GPU (gloo on CPU), started through `accelerate launch`; "
                   "each takes --batch-size rows per step.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit without building anything.")
@click.pass_context
def finetune(ctx: click.Context, config_file, dry_run, num_processes, **flags) -> None:
    """Fine-tune a model with one of qsvd's adapter methods."""
    with user_errors(ctx):
        flags["eval_data"] = list(flags["eval_data"]) or None  # click gives () when the flag is absent
        if flags.pop("packing"):
            if flags["batching"] not in (None, "packed"):
                raise QSVDError(f"--packing is --batching packed: give one of --packing and --batching {flags['batching']}")
            flags["batching"] = "packed"
        config = FinetuneConfig.resolve(config_file, **flags)
        if dry_run:
            click.echo(yaml.safe_dump(config.resolved(), sort_keys=False), nl=False)
            return
        if num_processes > 1 and not launched():
            with one_writer(config.output_dir, wait=False):  # a run being written is told here too
                check_inputs(config)  # a bad input is told here, once, not by every process
            ctx.exit(relaunch(num_processes, without_option(sys.argv[1:], "--num-processes")))
        run_finetune(config)


@cli.command()
@split_options
@click.pass_context
def init(ctx: click.Context, config_file, **flags) -> None:
    """Only split and quantize the model, into the prepared-model cache that `finetune` reuses."""
    with user_errors(ctx):
        run_init(FinetuneConfig.resolve(config_file, **flags))


@cli.command("eval")
@click.argument("target", metavar="RUN_DIR_OR_MODEL")
@click.option("--data", required=True, help="Rows in any form finetune's --data takes, or plain text for ppl: a 'text' field or a .txt file.")
@click.option("--task", type=click.Choice(EVAL_TASKS), help="gen: greedy generation, answer extracted; choice: the most likely answer option; nll: the reference answer's mean NLL per token, with a bootstrap 95% interval; ppl: perplexity; pref: how often the chosen response's reward beats the rejected one's (a dpo or orpo run's implicit reward; else the log-likelihood per token), and the mean margin (default: chosen by the data).")
@click.option("--bits", type=int, help="A plain model's storage: 4, 8 or 16 (default 16); a run keeps its own.")
@click.option("--batch-size", type=int, default=EVAL_DEFAULT["batch_size"], show_default=True, help="Rows per batch.")
@click.option("--max-new-tokens", type=int, default=EVAL_DEFAULT["max_new_tokens"], show_default=True, help="gen: longest answer.")
@click.option("--seq-len", type=int, default=EVAL_DEFAULT["seq_len"], show_default=True, help="ppl: tokens per window.")
@click.option("--max-examples", type=int, help="Score only the first N rows.")
@click.option("--revision", help=REVISION_HELP + " For a plain model.")
@click.option("--data-config", help="A hub dataset's configuration.")
@click.option("--data-split", help="A hub dataset's (or saved DatasetDict's) split (default test).")
@click.option("--predictions", help="JSONL of per-example predictions (default: eval-<data>-<task>.jsonl in the run dir, or here).")
@click.pass_context
def eval_(ctx: click.Context, target, **options) -> None:
    """Score a run directory or a plain model on held-out data."""
    with user_errors(ctx):
        run_evaluate(target, **options)


@cli.command()
@click.argument("target", metavar="RUN_DIR | MODEL | FILE.gguf")
@click.option("--prompt", help="Answer this one message and exit (for scripts).")
@click.option("--system", help="A system prompt, first in every conversation.")
@click.option("--max-new-tokens", type=int, default=CHAT_DEFAULT["max_new_tokens"], show_default=True, help="Longest answer.")
@click.option("--temperature", type=float, default=CHAT_DEFAULT["temperature"], show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=CHAT_DEFAULT["top_p"], show_default=True, help="Sample within this much probability.")
@click.option("--bits", type=int, help="A plain model's storage: 4, 8 or 16 (default 16); a run keeps its own.")
@click.option("--revision", help=REVISION_HELP + " For a plain model.")
@click.pass_context
def chat(ctx: click.Context, target, **options) -> None:
    """Talk to a run (its base plus the adapter, as trained), a model, or a GGUF file (through llama.cpp).

    Answers stream as they are generated; Ctrl-C ends an answer, /reset starts over, /exit leaves."""
    with user_errors(ctx):
        run_chat(target, **options)


@cli.command("export")
@click.argument("run_dir")
@click.option("--format", "format_", type=click.Choice(FORMATS), default=EXPORT_DEFAULT["format"], show_default=True,
              help="peft: a LoRA/DoRA adapter for PeftModel on the original base; merged: a full HF checkpoint; "
                   "gguf: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile.")
@click.option("--output", help="Export directory (default: RUN_DIR-peft or RUN_DIR-merged beside the run); "
                               "gguf: the file (default: RUN_DIR-<gguf type>.gguf).")
@click.option("--base", type=click.Choice(BASES), default=EXPORT_DEFAULT["base"], show_default=True,
              help="merged, gguf: merge into the original weights, or into deq(Q(W)), the weights the adapter was trained against.")
@click.option("--gguf-type", type=click.Choice(EXPORT_TYPES), default=EXPORT_DEFAULT["gguf_type"], show_default=True,
              help="gguf: weight type. q8_0: 8-bit blocks of 32, about half the size of f16; q5_1, q5_0, q4_1, "
                   "q4_0: 5 or 4 bits in blocks of 32; q6_k, q5_k_m, q4_k_m: llama.cpp's k-quants, made by llama.cpp "
                   "itself (the qsvd[llama-cpp] extra); q4_k_m is Ollama's and LM Studio's usual type.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=EXPORT_DEFAULT["dtype"], show_default=True, help="merged: weight dtype.")
@click.option("--shard-size", default=EXPORT_DEFAULT["shard_size"], show_default=True, help="merged: largest safetensors shard; peak memory is about twice this plus one layer, whatever the model size.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export in --output.")
@click.option("--push-to-hub", metavar="ORG/NAME", help="Then upload the export to this Hub model repo (made if missing; "
                                                        "needs `hf auth login` or HF_TOKEN).")
@click.option("--private", is_flag=True, help="--push-to-hub: make a new repo private.")
@click.option("--revision", help="--push-to-hub: the branch to commit to (made if missing; default main).")
@click.pass_context
def export(ctx: click.Context, run_dir, format_, **options) -> None:
    """Export a run as a PEFT adapter, a merged checkpoint that any HF stack loads, or a GGUF file."""
    with user_errors(ctx):
        run_export(run_dir, format=format_, **options)


@cli.command()
@click.option("--model", default=DEFAULT.model, help=MODEL_HELP + " Only its config is read.")
@click.option("--revision", help=REVISION_HELP)
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT.method, show_default=True)
@click.option("--bits", type=int, default=DEFAULT.bits, show_default=True)
@click.option("--rank", type=int, default=DEFAULT.rank, show_default=True)
@click.option("--seq-len", type=int, default=DEFAULT.seq_len, show_default=True)
@click.option("--batch-size", type=int, default=DEFAULT.batch_size, show_default=True)
@click.option("--targets", help="Comma-separated layer names (default: every linear layer of the decoder blocks).")
@click.option("--no-gradient-checkpointing", "gradient_checkpointing", flag_value=False, default=DEFAULT.gradient_checkpointing,
              help="Plan without gradient checkpointing.")
@click.option("--gpu", type=click.Choice(list(GPUS)), help="Plan for this GPU (default: this machine's CPU and RAM).")
@click.option("--dtype", type=click.Choice(COMPUTE_DTYPES), default=DEFAULT.dtype, show_default=True,
              help="Compute dtype, as finetune's --dtype.")
@click.option("--num-processes", "processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes, as finetune's --num-processes.")
@click.pass_context
def plan(ctx: click.Context, targets, **options) -> None:
    """Will a run fit? Its memory, part by part, from the model's config alone."""
    with user_errors(ctx):
        run_plan(targets=tuple(targets.split(",")) if targets else None, **options)


@contextmanager
def user_errors(ctx: click.Context):
    """Turn a QSVDError, or a full disk, into 'error: …' and exit 2, unless --debug asks for the traceback;
    and SIGINT or SIGTERM into one line and exit 130 or 143."""
    try:
        yield
    except QSVDError as error:
        if ctx.obj["debug"]:
            raise
        click.echo(f"error: {error}", err=True)
        ctx.exit(2)
    except Exception as error:  # a full disk anywhere else: what was being written is a temporary, removed
        if ctx.obj["debug"] or not is_disk_full(error):
            raise
        click.echo(f"error: the disk is full: {first_line(error)}; nothing half-written was kept: free some space "
                   f"and run the command again", err=True)
        ctx.exit(2)
    except (Interrupted, KeyboardInterrupt) as error:
        if not isinstance(error, Interrupted):
            error = Interrupted(signal.SIGINT)
        click.echo(f"error: {error}", err=True)
        ctx.exit(error.exit_code)


def main() -> None:
    handle_signal(signal.SIGTERM, raise_interrupted)  # as Ctrl-C: through every `finally`, then one line
    cli(prog_name="qsvd")
