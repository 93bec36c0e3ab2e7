"""Training memory on real rows: EDoRA against LoRA, and DoRA against PEFT's QDoRA, side by side.

Every run trains one epoch of the first --rows rows of ../shared/data/gsm8k (rows of at most 512
tokens, the default batching) on SmolLM2-135M with a 4-bit NF4 base, rank 16 on all seven
projections, gradient checkpointing and paged 8-bit AdamW, at batch 4 and at batch 8: qsvd's lora,
edora and dora, and PEFT's QDoRA built the standard way (benchmarks/peers.py) trained through the
same loop. Each run is a fresh process.

Two figures a run, both of the training phase:
- the peak of live tensor bytes: every tensor storage alive, counted from the op that makes it until
  it is freed (a torch dispatch mode over `Trainer.train`; the parameters, buffers and optimizer state
  included), which is what `torch.cuda.max_memory_allocated` gives on a GPU, and repeats exactly;
- the peak RSS with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_): every buffer of
  1 MiB or more then goes back to the OS when freed, so the figure repeats to a few MB (it still
  holds the heap's smaller buffers and the process's own memory); under glibc's default a run's
  peak moves by about 100 MB with how the heap happened to be reused (edora at batch 4 measured
  1,259 and 1,365 MB in two identical runs), more than the differences measured here.
The steps are slower so: this benchmark measures memory only (benchmarks/throughput.py and
train_step.py measure speed). The last line printed is one JSON object with the peaks and ratios.

    python benchmarks/train_memory.py [--rows N] [--workdir DIR]    (about 26 minutes here)
"""

import argparse
import json
import os
import sys
from pathlib import Path

from peers import child_figures, smollm2_workdir, train_peer
from throughput import LR, RANK, SEQ_LEN, run_qsvd, write_rows

BATCHES = (4, 8)
RUNS = ["lora", "edora", "dora", "qdora"]
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def child(args) -> None:
    from qsvd.memory import count_live_tensors_in_training

    tensors = count_live_tensors_in_training()
    if args.child == "qdora":
        outcome, _ = train_peer(True, model=args.model, rank=RANK, data=args.data, seq_len=SEQ_LEN,
                                batch_size=args.batch_size, epochs=1, lr=LR)
        figures = {"peak_mb": outcome.train_peak_memory_mb}
    else:
        figures = run_qsvd(args.child, "auto", args, args.batch_size)
    print(json.dumps(figures | tensors))


def measure(name: str, batch_size: int, args, work: Path) -> dict:
    command = [sys.executable, __file__, "--child", name, "--batch-size", str(batch_size),
               "--model", args.model, "--data", args.data]
    print(f"running {name} at batch {batch_size} ...", file=sys.stderr, flush=True)
    log = work / f"{name}-{batch_size}.log"
    figures = child_figures(name, command, log, env=os.environ | FIXED_MMAP_THRESHOLD)
    print(f"  live tensors {figures['tensor_peak_mb']:,.1f} MB, RSS {figures['peak_mb']:,.1f} MB",
          file=sys.stderr, flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="GSM8K rows, one epoch (default 32)")
    parser.add_argument("--workdir", help="where to keep the model copy, data and prepared models; default: a temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with smollm2_workdir(args.workdir) as work:
        args.model, args.data = str(work / "smollm2-135m"), str(work / "gsm8k.jsonl")
        write_rows(Path(args.data), args.rows)
        runs = {(name, batch): measure(name, batch, args, work) for batch in BATCHES for name in RUNS}
    summary = {}
    for figure, label in (("tensor_peak_mb", "live tensors"), ("peak_mb", "RSS")):
        print(f"\n{label + ', MB':<22}" + "".join(f"{name:>10}" for name in RUNS) + f"{'edora ÷ lora':>14}{'dora ÷ qdora':>14}")
        for batch in BATCHES:
            peaks = {name: runs[name, batch][figure] for name in RUNS}
            edora, dora = peaks["edora"] / peaks["lora"], peaks["dora"] / peaks["qdora"]
            print(f"{'batch ' + str(batch):<22}" + "".join(f"{peaks[name]:>10,.1f}" for name in RUNS)
                  + f"{edora:>14.3f}{dora:>14.3f}")
            summary |= {f"{name}_batch{batch}_{figure}": round(peaks[name], 1) for name in RUNS}
            ratio = figure.removesuffix("_mb")
            summary |= {f"edora_vs_lora_batch{batch}_{ratio}": round(edora, 3),
                        f"dora_vs_qdora_batch{batch}_{ratio}": round(dora, 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
