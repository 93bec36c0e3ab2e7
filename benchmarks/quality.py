"""Quality that can be told apart: qsvd's methods against PEFT's QLoRA on real data.

SmolLM2-135M-Instruct (the embedded model, written once as bf16 safetensors so that both stacks
read the same files) with a 4-bit NF4 base is fine-tuned on ARC-Easy (and BoolQ, GSM8K with
--datasets) from `../shared/data` by milora, edora, lorasb, loraxs and pissa in qsvd, and by QLoRA
built the standard PEFT way, rank 16 on all seven projections. Each dataset's rows are split once
(seed DEV_SEED) into a dev split, a validation split and the training rows.

1. Learning rates: each run trains for a short budget at every rate of a grid around its default
   (× 0.5, 1, 2, extended while the best is at an edge); the rate with the lowest answer NLL on the
   *validation* split is kept.
2. At its rate, each run trains for the full budget; its dev answer NLL (`qsvd eval --task nll`,
   with a bootstrap 95% interval over rows) is scored at the init and at three points along the way:
   the learning curve. At the end: dev accuracy (`--task choice`, or `gen` for GSM8K) with its
   Wilson interval, and the NLL per token of a general-text sample (Python's reference
   documentation, from the standard library's pydoc_data), whose change from the 4-bit base is
   what the run forgot.
3. The report: the tables, quality.png (learning curves, and "learned vs forgot": dev-NLL gain
   against general-text NLL loss, as in Biderman et al. 2024, "LoRA Learns Less and Forgets Less"),
   and one verdict row per claim the methods are picked for: holds, fails, or cannot tell at this
   scale, decided by paired bootstrap intervals (the same dev rows and text windows for every run).

The budget is sized so that QLoRA's dev-NLL gain over the base is at least 5× its interval's
half-width (the report checks it). Each run is a fresh process whose figures are kept in
<dataset>-<run>-<lr>.json; a later invocation with the same budget reuses them, so an interrupted
benchmark goes on where it stopped. The last line printed is one JSON object.

    python benchmarks/quality.py [--quick] [--output DIR] [--data-dir ../shared/data] [--methods ...]
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from peers import SHARED_DATA, TARGETS, child_figures, peer_model, write_smollm2

from qsvd.evaluate import bootstrap_interval, write_jsonl

METHODS = ["milora", "edora", "lorasb", "loraxs", "pissa"]
PEER = "qlora"
PEER_LR = 2e-4  # QLoRA's (Dettmers et al. 2023) for 7B-13B models
LORASB_LR = {"math": 1e-4, "commonsense": 2e-3}  # the LoRA-SB paper's, by task type
RANK, BITS, DEV_SEED = 16, 4, 1234
DATASETS = {  # file under --data-dir, accuracy task, lorasb task type
    "arc_easy": ("arc_easy/train.json", "choice", "commonsense"),
    "boolq": ("boolq/train.json", "choice", "commonsense"),
    "gsm8k": ("gsm8k/train.jsonl", "gen", "math"),
}
BUDGETS = {  # sized for 2 CPU cores: the full run of four methods took 91 minutes there
    "full": dict(datasets=["arc_easy"], steps=32, grid_steps=10, grid=[0.5, 1.0, 2.0], batch=8, seq_len=256,
                 dev_rows=120, validation_rows=60, general_chars=16_000, max_new_tokens=160, grad_samples=64),
    "quick": dict(datasets=["arc_easy"], steps=3, grid_steps=2, grid=[1.0, 2.0], batch=2, seq_len=256,
                  dev_rows=8, validation_rows=4, general_chars=2_000, max_new_tokens=32, grad_samples=4),
}
GRID_EXTENSIONS = 2  # a further halving or doubling of the rate where the grid's best is at its edge
CURVE_POINTS = 3  # dev NLL at the init and at every third of the steps
MIN_SIGNAL = 5.0  # QLoRA's dev-NLL gain over the base, in half-widths of its interval
MARGIN = 0.1  # "as well as QLoRA": dev NLL at most this share of QLoRA's gain above QLoRA's
GENERAL_WINDOW = 128  # tokens a general-text window: the rows of the retention bootstrap
EVAL_BATCH = 16


# -- data ----------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines() if line]


def write_splits(data_dir: Path, out: Path, budget: dict, names: list[str]) -> dict[str, dict[str, Path]]:
    """Each dataset's dev, validation and training rows, drawn once by DEV_SEED: dev and
    validation rows are never trained on, and the learning rate is never chosen on dev."""
    splits = {}
    for name in names:
        rows = read_records(data_dir / DATASETS[name][0])
        order = list(range(len(rows)))
        random.Random(DEV_SEED).shuffle(order)
        dev, validation = budget["dev_rows"], budget["validation_rows"]
        parts = {"dev": order[:dev], "validation": order[dev:dev + validation], "train": order[dev + validation:]}
        splits[name] = {part: out / f"{name}-{part}.jsonl" for part in parts}
        for part, indices in parts.items():
            write_jsonl(splits[name][part], [rows[i] for i in indices])
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

def curve_steps(steps: int) -> list[int]:
    return sorted({max(1, round(steps * k / CURVE_POINTS)) for k in range(1, CURVE_POINTS + 1)})


def run_child(args) -> dict:
    """Train `args.child` at `args.lr` (nothing, for the base model), scoring the answer NLL of
    `args.dev` along the way; at the end, with `args.final`, also accuracy and the general text."""
    from transformers import Trainer, TrainerCallback, set_seed

    from qsvd.config import FinetuneConfig
    from qsvd.data import read_eval_rows, tokenize_rows, training_rows
    from qsvd.evaluate import evaluate_model
    from qsvd.finetune import init_from_gradients, model_files
    from qsvd.methods import METHODS as REGISTRY
    from qsvd.prepared import load_or_split
    from qsvd.split import quantized_model
    from qsvd.train import train

    out = Path(args.out)
    dev_rows = read_eval_rows(args.dev)
    figures = {"lr": args.lr, "trainable": 0, "final_loss": None, "train_s": 0.0, "eval_s": 0.0, "curve": []}

    def score_dev(model, tokenizer, step):
        start = time.perf_counter()
        result = evaluate_model(model, tokenizer, dev_rows, "nll", out / f"{args.name}-dev-nll-{step}.jsonl",
                                EVAL_BATCH)
        rows = [json.loads(line) for line in Path(result.predictions).read_text().splitlines()]
        figures["curve"].append({"step": step, "nll": result.nll, "ci95": result.nll_ci95})
        figures["dev_rows"] = {"nll": [row["nll"] for row in rows], "tokens": [row["tokens"] for row in rows]}
        figures["eval_s"] += time.perf_counter() - start

    class DevCurve(TrainerCallback):  # a final run's learning curve; a grid run's last step only
        def on_step_end(self, _args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step in (curve_steps(args.steps) if args.final else [args.steps]):
                score_dev(model, processing_class, state.global_step)

    if args.child == "base":
        config = FinetuneConfig.resolve(model=args.model)
        files, tokenizer = model_files(config)
        model = quantized_model(files, BITS)
        score_dev(model, tokenizer, 0)
    else:
        method = "lora" if args.child == PEER else args.child
        config = FinetuneConfig.resolve(
            model=args.model, method=method, bits=BITS, rank=RANK, targets=TARGETS, data=args.train, lr=args.lr,
            max_steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, task_type=args.task_type,
            grad_samples=args.grad_samples, save_steps=None, output=str(out / args.name), overwrite=True)
        files, tokenizer = model_files(config)
        dataset = tokenize_rows(training_rows(config.data), tokenizer, config.seq_len).rows
        set_seed(config.seed)
        if args.child == PEER:
            model = peer_model(args.model, RANK)
        else:
            model, _ = load_or_split(files, config.spec(), config.targets, config.seed)
            if REGISTRY[method].needs_gradient_init:
                init_from_gradients(model, dataset, tokenizer, config)
        if args.final:
            score_dev(model, tokenizer, 0)
        evals_before = figures["eval_s"]
        outcome = train(model, tokenizer, dataset, config, out / f"{args.name}-trainer", callbacks=[DevCurve()],
                        **({"trainer_class": Trainer} if args.child == PEER else {}))
        figures |= {"final_loss": outcome.final_loss, "train_s": outcome.seconds - (figures["eval_s"] - evals_before),
                    "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if args.final:
        accuracy = evaluate_model(model, tokenizer, dev_rows, args.task,
                                  out / f"{args.name}-dev-{args.task}.jsonl", EVAL_BATCH, args.max_new_tokens)
        general = evaluate_model(model, tokenizer, read_eval_rows(args.general), "ppl",
                                 out / f"{args.name}-general.jsonl", EVAL_BATCH, seq_len=GENERAL_WINDOW)
        windows = [json.loads(line) for line in Path(general.predictions).read_text().splitlines()]
        figures |= {"correct": accuracy.correct, "examples": accuracy.examples, "accuracy": accuracy.accuracy,
                    "acc_ci95": accuracy.summary()["ci95"],
                    "general_rows": {"nll": [w["nll"] for w in windows], "tokens": [w["tokens"] for w in windows]}}
    return figures


def measure(name: str, lr: float | None, dataset: str, split: str, args, splits: dict, general: Path) -> dict:
    """One run in a fresh process: `args.budget`'s full steps scored on dev (`split` "dev"), or
    its grid steps scored on the validation split; the figures are the last line it prints."""
    _, task, task_type = DATASETS[dataset]
    final = split == "dev"
    steps = args.budget["steps" if final else "grid_steps"]
    run = f"{dataset}-{name}" + (f"-{lr:g}" if lr else "") + ("" if final else "-grid")
    command = [sys.executable, __file__, "--child", name, "--name", run, "--model", args.model,
               "--train", splits[dataset]["train"], "--dev", splits[dataset][split], "--general", general,
               "--task", task, "--task-type", task_type, "--out", args.output, f"--steps={steps}",
               *([f"--lr={lr}"] if lr else []), *(["--final"] if final else []),
               *[f"--{key.replace('_', '-')}={value}" for key, value in args.budget.items()
                 if key in ("batch", "seq_len", "max_new_tokens", "grad_samples") and value is not None]]
    log, saved = Path(args.output) / f"{run}.log", Path(args.output) / f"{run}.json"
    earlier = json.loads(saved.read_text()) if saved.is_file() else {}
    if earlier.get("budget") == args.budget:
        print(f"{run}: measured before, in {saved}", file=sys.stderr, flush=True)
        return earlier["figures"]
    print(f"{run} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    figures = child_figures(run, command, log)
    saved.write_text(json.dumps({"budget": args.budget, "figures": figures}) + "\n")
    print(f"  {split} answer NLL {figures['curve'][-1]['nll']:.4f}, {time.perf_counter() - start:.0f} s",
          file=sys.stderr, flush=True)
    return figures


def default_lr(name: str, task_type: str) -> float:
    from qsvd.methods import METHODS as REGISTRY

    return {PEER: PEER_LR, "lorasb": LORASB_LR[task_type]}.get(name) or REGISTRY[name].default_lr


def best_rate(name: str, dataset: str, args, splits: dict, general: Path) -> tuple[float, dict[float, float]]:
    """The rate with the lowest validation answer NLL after the short budget, and every rate's NLL:
    the grid around the default, extended by halving or doubling (GRID_EXTENSIONS at most) while
    the best is at its edge."""
    centre = default_lr(name, DATASETS[dataset][2])
    scores = {}
    rates = [centre * factor for factor in args.budget["grid"]]
    for _ in range(GRID_EXTENSIONS + 1):
        for lr in rates:
            if lr not in scores:
                scores[lr] = measure(name, lr, dataset, "validation", args, splits, general)["curve"][-1]["nll"]
        best = min(scores, key=scores.get)
        if best not in (min(scores), max(scores)):
            break
        rates = [best / 2 if best == min(scores) else best * 2]
    return best, dict(sorted(scores.items()))


# -- the report ----------------------------------------------------------------------------------

def paired(run: dict, other: dict, key: str) -> tuple[float, float, float]:
    """run − other of a per-token NLL over the same rows (dev answers or general-text windows),
    with its paired bootstrap 95% interval."""
    a, b = run[key], other[key]
    difference = [x - y for x, y in zip(a["nll"], b["nll"])]
    return sum(difference) / sum(a["tokens"]), *bootstrap_interval(difference, a["tokens"])


def dev_nll(figures: dict) -> float:
    return figures["curve"][-1]["nll"]


def signal(runs: dict[str, dict]) -> float:
    """QLoRA's dev-NLL gain over the base, in half-widths of its dev NLL's interval."""
    low, high = runs[PEER]["curve"][-1]["ci95"]
    return (dev_nll(runs["base"]) - dev_nll(runs[PEER])) / ((high - low) / 2)


def verdicts(runs: dict[str, dict]) -> list[dict]:
    """One row per claim, from paired intervals against QLoRA on the same rows.

    "Learns as well": the method's dev NLL is above QLoRA's by at most MARGIN of QLoRA's gain over
    the base (holds: the interval's top is below that; fails: its bottom is above it).
    "Forgets less": its general-text NLL is below QLoRA's (holds: the interval is below 0; fails:
    above 0). Every claim is "cannot tell" where QLoRA's own gain is below MIN_SIGNAL."""
    peer, base = runs[PEER], runs["base"]
    margin = MARGIN * (dev_nll(base) - dev_nll(peer))
    measurable = signal(runs) >= MIN_SIGNAL  # else "as well as QLoRA" is measured against nothing learned
    claims = [("milora_learns", "milora", "MiLoRA learns as well as LoRA", "dev_rows", margin),
              ("milora_forgets_less", "milora", "MiLoRA forgets less than LoRA", "general_rows", 0.0),
              ("edora_matches", "edora", "EDoRA matches LoRA with 20-90x fewer trainable parameters", "dev_rows", margin),
              ("lorasb_matches", "lorasb", "LoRA-SB matches LoRA with 20-90x fewer trainable parameters", "dev_rows",
               margin)]
    rows = []
    for claim_id, name, claim, key, bound in claims:
        if name not in runs:
            continue
        difference, low, high = paired(runs[name], peer, key)
        if not measurable:
            verdict = "cannot tell"
        elif key == "general_rows":
            verdict = "holds" if high < bound else "fails" if low > bound else "cannot tell"
        else:
            verdict = "holds" if high <= bound else "fails" if low > bound else "cannot tell"
        rows.append({"id": claim_id, "claim": claim, "verdict": verdict, "difference": difference, "ci95": [low, high],
                     "bound": bound, "params_ratio": runs[PEER]["trainable"] / runs[name]["trainable"]})
    return rows


def write_report(results: dict[str, dict[str, dict]], grids: dict[str, dict[str, dict]], budget: dict,
                 out: Path) -> dict:
    """quality.md, quality.png and quality.json into `out`; returns the summary that the last line prints."""
    lines = ["# Quality on real data: SmolLM2-135M-Instruct, 4-bit NF4 base", "",
             f"Every run: {budget['steps']} steps at batch {budget['batch']} (rows of at most {budget['seq_len']} "
             f"tokens), rank {RANK} (alpha = rank) on {', '.join(TARGETS)}, paged 8-bit AdamW, linear schedule "
             f"with 3% warm-up, seed 42; its learning rate chosen from × {', '.join(f'{f:g}' for f in budget['grid'])} "
             f"its default (extended while the best is at an edge) by the answer NLL of {budget['validation_rows']} validation rows after "
             f"{budget['grid_steps']} steps. LoRA-SB's gradient estimate: "
             f"{budget['grad_samples'] or 'the task type default of 170 or 50'} rows. Dev: {budget['dev_rows']} rows, never trained on or tuned on. "
             f"Dev NLL: mean per token of the reference answer, bootstrap 95% interval over rows. Retention: "
             f"the change of general-text NLL per token against the 4-bit base (Python's reference "
             f"documentation, {GENERAL_WINDOW}-token windows); positive is forgetting.", ""]
    summary = {}
    for dataset, runs in results.items():
        base = runs["base"]
        lines += [f"## {dataset}", "", "Learning rates (validation answer NLL after the short budget; chosen in bold):",
                  "", "| run | rate: validation NLL, lowest rate first |", "|---|---|"]
        for name, grid in grids[dataset].items():
            cells = [f"**{lr:g}: {nll:.4f}**" if lr == runs[name]["lr"] else f"{lr:g}: {nll:.4f}"
                     for lr, nll in grid.items()]
            lines.append(f"| {run_label(name)} | " + ", ".join(cells) + " |")
        lines += ["", "| run | lr | trainable params | dev NLL | 95% CI | gain vs base | dev accuracy | 95% CI | "
                  "general NLL change | 95% CI | final loss | train s |", "|---" * 12 + "|"]
        for name, figures in runs.items():
            lines.append(table_row(name, figures, base))
            low, high = figures["curve"][-1]["ci95"]
            summary |= {f"{dataset}_{name}_dev_nll": round(dev_nll(figures), 4),
                        f"{dataset}_{name}_dev_nll_ci95": [round(low, 4), round(high, 4)],
                        f"{dataset}_{name}_acc": round(figures["accuracy"], 4)}
            if name != "base":
                summary[f"{dataset}_{name}_dretention"] = round(paired(figures, base, "general_rows")[0], 4)
        if PEER in runs:
            strength = signal(runs)
            summary[f"{dataset}_signal"] = round(strength, 1)
            lines += ["", f"Signal: QLoRA's dev-NLL gain over the base is {strength:.1f}× its interval's half-width "
                          f"({'at least' if strength >= MIN_SIGNAL else 'below'} the {MIN_SIGNAL:g}× this budget is "
                          f"sized for{'' if strength >= MIN_SIGNAL else ': every claim is cannot tell'}).", "", "Claims (paired bootstrap over the same rows, against QLoRA):", "",
                      "| claim | verdict | difference vs QLoRA | 95% CI | bound | QLoRA / its trainable params |",
                      "|---|---|---|---|---|---|"]
            for row in verdicts(runs):
                low, high = row["ci95"]
                lines.append(f"| {row['claim']} | **{row['verdict']}** | {row['difference']:+.4f} | "
                             f"{low:+.4f} to {high:+.4f} | {row['bound']:+.4f} | {row['params_ratio']:.1f}× |")
                summary[f"{dataset}_verdict_{row['id']}"] = row["verdict"]
        lines.append("")
    lines += ["Dev NLL is of the full budget's final step; 'difference' is the run's NLL per token minus "
              f"QLoRA's on the same rows. Learning as well: the difference's interval must lie below {MARGIN:g}× "
              "QLoRA's gain over the base (holds), or above it (fails). Forgetting less: the general-text "
              "difference's interval must lie below 0 (holds), or above it (fails). Otherwise: cannot tell.", ""]
    (out / "quality.md").write_text("\n".join(lines))
    (out / "quality.json").write_text(json.dumps({"budget": budget, "grids": {d: {n: {str(k): v for k, v in g.items()}
                                                  for n, g in grid.items()} for d, grid in grids.items()},
                                                  "results": results}, indent=2) + "\n")
    plot(results, out / "quality.png")
    return summary


def run_label(name: str) -> str:
    return "PEFT QLoRA" if name == PEER else name


def table_row(name: str, figures: dict, base: dict) -> str:
    low, high = figures["curve"][-1]["ci95"]
    acc_low, acc_high = figures["acc_ci95"]
    trained = name != "base"
    _, forgot_low, forgot_high = paired(figures, base, "general_rows")
    cells = [run_label(name), f"{figures['lr']:g}" if trained else "–", f"{figures['trainable']:,}",
             f"{dev_nll(figures):.4f}", f"{low:.4f}–{high:.4f}",
             f"{dev_nll(base) - dev_nll(figures):+.4f}" if trained else "–",
             f"{100 * figures['accuracy']:.1f}%", f"{100 * acc_low:.1f}–{100 * acc_high:.1f}%",
             f"{paired(figures, base, 'general_rows')[0]:+.4f}" if trained else "–",
             f"{forgot_low:+.4f} to {forgot_high:+.4f}" if trained else "–",
             f"{figures['final_loss']:.4f}" if trained else "–", f"{figures['train_s']:.0f}"]
    return "| " + " | ".join(cells) + " |"


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    """Two panels a dataset: the learning curves (dev NLL against step, the base's as a dashed
    line), and learned vs forgot (dev-NLL gain against general-text NLL change, one point a run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 2, figsize=(11, 4.2 * len(results)), squeeze=False)
    for (curves, tradeoff), (dataset, runs) in zip(axes, results.items()):
        base = runs["base"]
        curves.axhline(dev_nll(base), color="grey", linestyle="--", label="base")
        for name, figures in runs.items():
            if name == "base":
                continue
            steps = [point["step"] for point in figures["curve"]]
            curves.plot(steps, [point["nll"] for point in figures["curve"]], marker="s" if name == PEER else "o",
                        label=run_label(name))
            forgot, low, high = paired(figures, base, "general_rows")
            gain = dev_nll(base) - dev_nll(figures)
            gain_low, gain_high = figures["curve"][-1]["ci95"]
            tradeoff.errorbar(forgot, gain, xerr=[[forgot - low], [high - forgot]],
                              yerr=[[dev_nll(figures) - gain_low], [gain_high - dev_nll(figures)]],
                              fmt="s" if name == PEER else "o", capsize=3, label=run_label(name))
        curves.set(title=f"{dataset}: learning curves", xlabel="step", ylabel="dev answer NLL per token")
        tradeoff.set(title=f"{dataset}: learned vs forgot", xlabel="general-text NLL change (forgot →)",
                     ylabel="dev-NLL gain over the base (learned ↑)")
        tradeoff.axvline(0, color="grey", linewidth=0.5)
        curves.legend(fontsize=8)
        tradeoff.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 steps, a 2-point grid of 2 steps, 8 dev rows: a check that runs in minutes")
    parser.add_argument("--output", default="runs/quality", help="where the report, runs and predictions go")
    parser.add_argument("--data-dir", default=str(SHARED_DATA),
                        help="folder with arc_easy/, boolq/ and gsm8k/ (default: ../shared/data)")
    parser.add_argument("--methods", default=",".join([*METHODS, PEER]), help="runs besides the base model")
    parser.add_argument("--datasets", help=f"some of {','.join(DATASETS)} (default: arc_easy)")
    parser.add_argument("--workdir", help="alias of --output, for the test harness")
    for flag in ("child", "name", "model", "train", "dev", "general", "task", "task-type", "out"):
        parser.add_argument(f"--{flag}", help=argparse.SUPPRESS)
    for flag in ("steps", "batch", "seq-len", "max-new-tokens", "grad-samples"):
        parser.add_argument(f"--{flag}", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--final", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args)))
        return

    args.output = str(Path(args.workdir or args.output).resolve())
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    args.budget = BUDGETS["quick" if args.quick else "full"]
    names = args.datasets.split(",") if args.datasets else args.budget["datasets"]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        sys.exit(f"--datasets: unknown {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    data_dir = Path(args.data_dir)
    missing = [DATASETS[name][0] for name in names if not (data_dir / DATASETS[name][0]).is_file()]
    if missing:
        sys.exit(f"--data-dir {data_dir} lacks {', '.join(missing)}")
    os.environ["QSVD_CACHE"] = str(out / "cache")  # each method's split is made once, for all runs
    args.model = str(out / "smollm2-135m")
    write_smollm2(Path(args.model))
    splits = write_splits(data_dir, out, args.budget, names)
    general = write_general_text(out / "general.jsonl", args.budget["general_chars"])
    results, grids = {}, {}
    for dataset in names:
        results[dataset], grids[dataset] = {"base": measure("base", None, dataset, "dev", args, splits, general)}, {}
        for name in args.methods.split(","):
            lr, grids[dataset][name] = best_rate(name, dataset, args, splits, general)
            results[dataset][name] = measure(name, lr, dataset, "dev", args, splits, general)
    summary = write_report(results, grids, args.budget, out)
    print((out / "quality.md").read_text(), file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
