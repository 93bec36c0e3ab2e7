"""Training-step time and memory: every qsvd method against PEFT's QLoRA and QDoRA, side by side.

All runs train SmolLM2-135M (the embedded model, written here once as safetensors so that
both stacks read the same files) with a 4-bit NF4 frozen base, rank 16 on all seven
projections, batch 4 × 256 tokens, gradient checkpointing, paged 8-bit AdamW, the same data
and the same Trainer arguments (qsvd's). The peers are built and trained the standard PEFT
way: `from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant))`,
`prepare_model_for_kbit_training`, `get_peft_model(LoraConfig(r=16, use_dora=...))`, and
transformers' own `Trainer` (qsvd trains with its `SupervisedTokensTrainer`).

Each run is a fresh process, and every run is made once a round (two rounds, in alternating
order; one with --quick), so that a drift in the machine's speed reaches all runs alike.
Figures: the median wall time of the steps after warm-up over all rounds, the
peak memory of the training phase (peak RSS on CPU; on a GPU what torch's allocator held plus
the paged optimizer state), the setup peak (load, split, quantize, LoRA-SB's gradient estimate) and the trainable
parameters. The last line printed is one JSON object with the ratios to the peers.

    python benchmarks/train_step.py [--quick] [--workdir DIR] [--methods edora,qlora,...]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from peers import TARGETS, child_figures, smollm2_workdir, train_peer

QSVD_METHODS = ["lora", "dora", "pissa", "milora", "loraxs", "edora", "lorasb"]
PEERS = {"qlora": False, "qdora": True}  # name → use_dora
RANK, BATCH, SEQ_LEN = 16, 4, 256
PROBLEMS_PER_ROW = 3  # built-in word problems joined into one row of about 230-250 tokens


def write_data(path: Path, rows: int) -> None:
    """Rows of several of qsvd's built-in word problems each, so that batches are ~SEQ_LEN long."""
    from qsvd.data import synthetic_arithmetic

    problems = synthetic_arithmetic(rows * PROBLEMS_PER_ROW, seed=0)
    with open(path, "w") as out:
        for start in range(0, len(problems), PROBLEMS_PER_ROW):
            chunk = problems[start:start + PROBLEMS_PER_ROW]
            out.write(json.dumps({"question": " ".join(chunk["question"]),
                                  "answer": "\n".join(chunk["answer"])}) + "\n")


def run_peer(name: str, args) -> dict:
    outcome, trainable = train_peer(PEERS[name], model=args.model, rank=RANK, data=args.data, seq_len=SEQ_LEN,
                                    batch_size=BATCH, max_steps=args.warmup + args.steps)
    return {"step_seconds": outcome.step_seconds, "train_peak_mb": outcome.train_peak_memory_mb,
            "setup_peak_mb": outcome.setup_peak_memory_mb, "trainable": trainable}


def run_qsvd(method: str, args) -> dict:
    import qsvd

    with tempfile.TemporaryDirectory() as output:
        qsvd.finetune(model=args.model, method=method, rank=RANK, bits=4, targets=TARGETS, data=args.data,
                      seq_len=SEQ_LEN, batch_size=BATCH, max_steps=args.warmup + args.steps,
                      output=output, overwrite=True)
        record = json.loads((Path(output) / "qsvd_config.json").read_text())
        log = [json.loads(line) for line in (Path(output) / "train_log.jsonl").read_text().splitlines()]
    return {"step_seconds": [entry["step_seconds"] for entry in log if "step_seconds" in entry],
            "train_peak_mb": record["train_peak_memory_mb"], "setup_peak_mb": record["setup_peak_memory_mb"],
            "trainable": record["trainable_params"]}


def child(args) -> None:
    figures = run_peer(args.child, args) if args.child in PEERS else run_qsvd(args.child, args)
    print(json.dumps(figures))


def measure(name: str, args, log: Path) -> dict:
    """One fresh process of `name`: its timed steps (after warm-up), peaks and trainable params."""
    command = [sys.executable, __file__, "--child", name, "--model", args.model, "--data", args.data,
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    figures = child_figures(name, command, log)
    figures["timed_s"] = figures.pop("step_seconds")[args.warmup:]
    print(f"  {name}: steps {', '.join(f'{s:.2f}' for s in figures['timed_s'])} s, "
          f"training peak {figures['train_peak_mb']:,.0f} MB", file=sys.stderr, flush=True)
    return figures


def measure_rounds(names: list[str], args, work: Path) -> dict[str, dict]:
    """Every run once a round, in alternating order, so that a drift in the machine's speed
    reaches all of them alike; the median is over the timed steps of all rounds, the peaks the max."""
    runs = {name: [] for name in names}
    for index in range(args.rounds):
        for name in names if index % 2 == 0 else reversed(names):
            runs[name].append(measure(name, args, work / f"{name}-{index}.log"))
    return {name: {"median_s": statistics.median(s for run in rounds for s in run["timed_s"]),
                   "train_peak_mb": max(run["train_peak_mb"] for run in rounds),
                   "setup_peak_mb": max(run["setup_peak_mb"] for run in rounds),
                   "trainable": rounds[0]["trainable"]}
            for name, rounds in runs.items()}


def report(results: dict[str, dict]) -> dict:
    qlora, qdora = results["qlora"], results["qdora"]
    print(f"\n{'run':<8}{'trainable':>12}{'step s':>9}{'÷ QLoRA':>9}{'÷ QDoRA':>9}"
          f"{'train peak MB':>15}{'÷ QLoRA':>9}{'setup peak MB':>15}")
    for name, figures in results.items():
        print(f"{name:<8}{figures['trainable']:>12,}{figures['median_s']:>9.2f}"
              f"{figures['median_s'] / qlora['median_s']:>9.3f}{figures['median_s'] / qdora['median_s']:>9.3f}"
              f"{figures['train_peak_mb']:>15,.0f}{figures['train_peak_mb'] / qlora['train_peak_mb']:>9.3f}"
              f"{figures['setup_peak_mb']:>15,.0f}")
    summary = {}
    for name, figures in results.items():
        if name not in PEERS:
            summary[f"{name}_vs_qlora_time"] = round(figures["median_s"] / qlora["median_s"], 3)
            summary[f"{name}_vs_qdora_time"] = round(figures["median_s"] / qdora["median_s"], 3)
            summary[f"{name}_vs_qlora_mem"] = round(figures["train_peak_mb"] / qlora["train_peak_mb"], 3)
    summary |= {f"{name}_step_s": round(figures["median_s"], 3) for name, figures in results.items()}
    summary |= {f"{name}_train_peak_mb": round(figures["train_peak_mb"]) for name, figures in results.items()}
    summary |= {f"{name}_setup_peak_mb": round(figures["setup_peak_mb"]) for name, figures in results.items()}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round of 1 warm-up and 2 timed steps, "
                                                             "instead of two rounds of 2 and 4")
    parser.add_argument("--methods", default=",".join(QSVD_METHODS),
                        help="qsvd methods to run (the peers always run)")
    parser.add_argument("--workdir", help="where to keep the model copy, data and prepared models; "
                                          "default: a temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    args.rounds, args.warmup, args.steps = (1, 1, 2) if args.quick else (2, 2, 4)

    with smollm2_workdir(args.workdir) as work:
        args.model, args.data = str(work / "smollm2-135m"), str(work / "data.jsonl")
        write_data(Path(args.data), rows=BATCH * (args.warmup + args.steps) * 2)
        summary = report(measure_rounds([*PEERS, *args.methods.split(",")], args, work))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
