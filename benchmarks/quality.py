"""Quality on real data: qsvd's methods against PEFT's QLoRA on ARC-Easy, BoolQ and GSM8K.

SmolLM2-135M-Instruct (the embedded model, written once as bf16 safetensors so that both stacks
read the same files) with a 4-bit NF4 base is fine-tuned on each training set in
`../shared/data` by milora, edora, lorasb, loraxs and pissa in qsvd, and by QLoRA built the
standard PEFT way, all under one budget (steps, batch, sequence length, rank 16 on all seven
projections), each at its own default learning rate. Each dataset's dev split is drawn once with
a fixed seed and never trained on.

Recorded: the base model's zero-shot dev accuracy (4-bit, as the methods' frozen base), each
method's dev accuracy with its 95% Wilson interval, trainable parameters, and the change in
perplexity on a held-out general-text sample (Python's own reference documentation, from the
standard library's pydoc_data) as a measure of retention. ARC-Easy and BoolQ are scored by the
log-likelihood of each answer option (`qsvd eval --task choice`), GSM8K by greedy generation
and its final number (`--task gen`).

Writes quality.md (the table), quality.png (accuracy against trainable parameters) and
quality.json into --output, every run's predictions beside them, and prints one JSON object as
the last line. Each run is a fresh process; its figures are kept in <dataset>-<run>.json, which a
later invocation with the same budget reuses, so an interrupted benchmark goes on where it stopped.

    python benchmarks/quality.py [--quick] [--output DIR] [--data-dir ../shared/data] [--methods ...]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from peers import TARGETS, peer_model, write_smollm2

from qsvd.evaluate import write_jsonl

METHODS = ["milora", "edora", "lorasb", "loraxs", "pissa"]
PEER = "qlora"
PEER_LR = 2e-4  # QLoRA's (Dettmers et al. 2023) for 7B-13B models
RANK, BITS, DEV_SEED = 16, 4, 1234
DATASETS = {  # file under --data-dir, eval task, lorasb task type, dev rows held out
    "arc_easy": ("arc_easy/train.json", "choice", "commonsense", 200),
    "boolq": ("boolq/train.json", "choice", "commonsense", 200),
    "gsm8k": ("gsm8k/train.jsonl", "gen", "math", 100),
}
BUDGETS = {  # sized for 2 CPU cores: the full run takes about 75 minutes there
    "full": dict(datasets=list(DATASETS), steps=16, batch=4, seq_len=320,
                 dev={"arc_easy": 100, "boolq": 100, "gsm8k": 32}, max_new_tokens=160, general_chars=12_000,
                 grad_samples=None),
    "quick": dict(datasets=["gsm8k"], steps=2, batch=2, seq_len=320, dev={"arc_easy": 8, "boolq": 8, "gsm8k": 4},
                  max_new_tokens=32, general_chars=3_000, grad_samples=4),
}
LORASB_LR = {"math": 1e-4, "commonsense": 2e-3}  # the LoRA-SB paper's, by task type
EVAL_BATCH = 16


# -- data ----------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


def write_splits(data_dir: Path, out: Path, budget: dict) -> dict[str, dict[str, Path]]:
    """Each dataset's train and dev files: the dev rows are drawn once by DEV_SEED and never
    trained on; the budget scores the first of them."""
    splits = {}
    for name, (file, _, _, held_out) in DATASETS.items():
        rows = read_records(data_dir / file)
        order = list(range(len(rows)))
        random.Random(DEV_SEED).shuffle(order)
        dev, train = order[:held_out], order[held_out:]
        splits[name] = {"train": out / f"{name}-train.jsonl", "dev": out / f"{name}-dev.jsonl"}
        write_jsonl(splits[name]["train"], [rows[i] for i in train])
        write_jsonl(splits[name]["dev"], [rows[i] for i in dev[:budget["dev"][name]]])
    return splits


def write_general_text(path: Path, chars: int) -> Path:
    """A fixed sample of general English text, `chars` long: topics of Python's reference documentation."""
    from pydoc_data.topics import topics

    texts, left = [], chars
    for key in sorted(topics)[::3]:
        if left <= 0:
            break
        texts.append({"text": topics[key][:left]})
        left -= len(texts[-1]["text"])
    write_jsonl(path, texts)
    return path


# -- one run, in its own process -----------------------------------------------------------------

def run_child(args) -> dict:
    """Train `args.child` (or nothing, for the base model), then score the dev set and the general text."""
    from transformers import Trainer

    from qsvd.config import FinetuneConfig
    from qsvd.data import build_dataset
    from qsvd.evaluate import evaluate_model, read_eval_rows
    from qsvd.load import load_tokenizer, resolve_model
    from qsvd.split import quantized_model
    from qsvd.train import train

    files = resolve_model(args.model)
    tokenizer = load_tokenizer(files)
    figures = {"lr": None, "trainable": 0, "final_loss": None, "train_s": 0.0}
    if args.child == "base":
        model = quantized_model(files, BITS)
    else:
        method = "lora" if args.child == PEER else args.child
        config = FinetuneConfig.resolve(
            model=args.model, method=method, bits=BITS, rank=RANK, targets=TARGETS, data=args.train,
            max_steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, task_type=args.task_type,
            grad_samples=args.grad_samples,
            lr={PEER: PEER_LR, "lorasb": LORASB_LR[args.task_type]}.get(args.child),
            output=str(Path(args.out) / f"{args.dataset}-{args.child}"), overwrite=True)
        figures["lr"] = config.learning_rate
        start = time.perf_counter()
        if args.child == PEER:
            model = peer_model(args.model, RANK)
            dataset = build_dataset(config.data, tokenizer, config.seq_len, config.seed)
            outcome = train(model, tokenizer, dataset, config, Path(config.output) / "trainer", trainer_class=Trainer)
            figures["final_loss"] = outcome.final_loss
        else:
            import qsvd

            summary = qsvd.finetune(config)
            model, figures["final_loss"] = summary.model, summary.final_loss
        figures["train_s"] = time.perf_counter() - start
        figures["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = Path(args.out)
    dev = evaluate_model(model, tokenizer, read_eval_rows(args.dev), args.task,
                         out / f"{args.dataset}-{args.child}-dev.jsonl", EVAL_BATCH, args.max_new_tokens)
    general = evaluate_model(model, tokenizer, read_eval_rows(args.general), "ppl",
                             out / f"{args.dataset}-{args.child}-general.jsonl", EVAL_BATCH)
    return figures | {"correct": dev.correct, "examples": dev.examples, "accuracy": dev.accuracy,
                      "ci95": dev.summary()["ci95"], "perplexity": general.perplexity}


def measure(name: str, dataset: str, args, splits: dict, general: Path) -> dict:
    """One run in a fresh process; its figures are the last line it prints."""
    _, task, task_type, _ = DATASETS[dataset]
    command = [sys.executable, __file__, "--child", name, "--dataset", dataset, "--model", args.model,
               "--train", splits[dataset]["train"], "--dev", splits[dataset]["dev"], "--general", general,
               "--task", task, "--task-type", task_type, "--out", args.output,
               *[f"--{key.replace('_', '-')}={value}" for key, value in args.budget.items()
                 if key in ("steps", "batch", "seq_len", "max_new_tokens", "grad_samples") and value is not None]]
    log, saved = Path(args.output) / f"{dataset}-{name}.log", Path(args.output) / f"{dataset}-{name}.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    if earlier.get("budget") == args.budget:
        print(f"{dataset}: {name}: measured before, in {saved}", file=sys.stderr, flush=True)
        return earlier["figures"]
    print(f"{dataset}: {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as stderr:
        result = subprocess.run(list(map(str, command)), stdout=subprocess.PIPE, stderr=stderr, text=True)
    if result.returncode != 0:
        sys.exit(f"{dataset} {name} failed (exit {result.returncode}); its log:\n{log.read_text()[-3000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    saved.write_text(json.dumps({"budget": args.budget, "figures": figures}) + "\n")
    print(f"  accuracy {figures['correct']}/{figures['examples']}, general-text perplexity "
          f"{figures['perplexity']:.3f}, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return figures


# -- the report ----------------------------------------------------------------------------------

def write_report(results: dict[str, dict[str, dict]], budget: dict, out: Path) -> dict:
    """quality.md (a table a dataset), quality.png (dev accuracy against trainable parameters)
    and quality.json into `out`; returns the summary that the last line prints."""
    lines = ["# Quality on real data: SmolLM2-135M-Instruct, 4-bit NF4 base", "",
             f"Budget for every run: {budget['steps']} steps, batch {budget['batch']}, sequence length "
             f"{budget['seq_len']}, rank {RANK} (alpha = rank) on {', '.join(TARGETS)}, paged 8-bit AdamW, "
             f"linear schedule with 3% warm-up, seed 42. Learning rates: each qsvd method's default, LoRA-SB's "
             f"paper value by task type (math {LORASB_LR['math']:g}, commonsense {LORASB_LR['commonsense']:g}), "
             f"QLoRA {PEER_LR:g}. Dev rows are held out of training with seed {DEV_SEED}. Dev accuracy with its "
             f"95% Wilson interval; Δ ppl is the change in perplexity on the general-text sample (Python's "
             f"reference documentation) against the base model at 4 bits.", ""]
    summary = {}
    for dataset, runs in results.items():
        base = runs["base"]
        lines += [f"## {dataset} ({DATASETS[dataset][1]}, {base['examples']} dev rows)", "",
                  "| run | lr | trainable params | dev accuracy | 95% CI | Δ vs base | general ppl | Δ ppl | final loss | train s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, figures in runs.items():
            lines.append(table_row(name, figures, base))
            summary[f"{dataset}_{name}_acc"] = round(figures["accuracy"], 4)
            if name != "base":
                summary[f"{dataset}_{name}_dppl"] = round(figures["perplexity"] - base["perplexity"], 4)
        lines.append("")
    (out / "quality.md").write_text("\n".join(lines))
    (out / "quality.json").write_text(json.dumps({"budget": budget, "results": results}, indent=2) + "\n")
    plot(results, out / "quality.png")
    return summary


def table_row(name: str, figures: dict, base: dict) -> str:
    low, high = figures["ci95"]
    trained = name != "base"
    cells = ["PEFT QLoRA" if name == PEER else name, f"{figures['lr']:g}" if trained else "–",
             f"{figures['trainable']:,}", f"{100 * figures['accuracy']:.1f}%", f"{100 * low:.1f}–{100 * high:.1f}%",
             f"{100 * (figures['accuracy'] - base['accuracy']):+.1f}" if trained else "–",
             f"{figures['perplexity']:.3f}",
             f"{figures['perplexity'] - base['perplexity']:+.3f}" if trained else "–",
             f"{figures['final_loss']:.4f}" if trained else "–", f"{figures['train_s']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    """One panel a dataset: dev accuracy (with its interval) against trainable parameters; the
    base model's zero-shot accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, (dataset, runs) in zip(axes[0], results.items()):
        axis.axhline(100 * runs["base"]["accuracy"], color="grey", linestyle="--", label="base, zero-shot")
        for name, figures in runs.items():
            if name == "base":
                continue
            low, high = figures["ci95"]
            accuracy = 100 * figures["accuracy"]
            axis.errorbar(figures["trainable"], accuracy, yerr=[[accuracy - 100 * low], [100 * high - accuracy]],
                          fmt="s" if name == PEER else "o", capsize=3, label="PEFT QLoRA" if name == PEER else name)
        axis.set(xscale="log", title=dataset, xlabel="trainable parameters", ylabel="dev accuracy (%)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="GSM8K only, 2 steps, 4 dev rows: a check that runs in minutes")
    parser.add_argument("--output", default="runs/quality", help="where the report, runs and predictions go")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"),
                        help="folder with arc_easy/, boolq/ and gsm8k/ (default: ../shared/data)")
    parser.add_argument("--methods", default=",".join([*METHODS, PEER]), help="runs besides the base model")
    parser.add_argument("--datasets", help=f"default: {','.join(DATASETS)} (with --quick: gsm8k)")
    parser.add_argument("--workdir", help="alias of --output, for the test harness")
    for flag in ("child", "dataset", "model", "train", "dev", "general", "task", "task-type", "out"):
        parser.add_argument(f"--{flag}", help=argparse.SUPPRESS)
    for flag in ("steps", "batch", "seq-len", "max-new-tokens", "grad-samples"):
        parser.add_argument(f"--{flag}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    args.output = str(Path(args.workdir or args.output).resolve())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    if not all((data_dir / file).is_file() for file, *_ in DATASETS.values()):
        sys.exit(f"--data-dir {data_dir} lacks {', '.join(file for file, *_ in DATASETS.values())}")
    args.budget = BUDGETS["quick" if args.quick else "full"]
    os.environ["QSVD_CACHE"] = str(out / "cache")  # each method's split is made once, for all datasets
    args.model = str(out / "smollm2-135m")
    write_smollm2(Path(args.model))
    splits = write_splits(data_dir, out, args.budget)
    general = write_general_text(out / "general.jsonl", args.budget["general_chars"])
    results = {}
    for dataset in args.datasets.split(",") if args.datasets else args.budget["datasets"]:
        results[dataset] = {name: measure(name, dataset, args, splits, general)
                            for name in ["base", *args.methods.split(",")]}
    summary = write_report(results, args.budget, out)
    print((out / "quality.md").read_text(), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
