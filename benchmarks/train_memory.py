"""Training memory on real rows: EDoRA against LoRA, and DoRA against PEFT's QDoRA, side by side.

Every run trains one epoch of the first --rows rows of ../shared/data/gsm8k (rows of at most 512
tokens, the default batching) on SmolLM2-135M with a 4-bit NF4 base, rank 16 on all seven
projections, gradient checkpointing and paged 8-bit AdamW, at batch 4 and at batch 8: qsvd's lora,
edora and dora, and PEFT's QDoRA built the standard way (benchmarks/peers.py) trained through the
same loop. Each run is a fresh process.

The figure is the peak RSS of training with glibc's mmap threshold fixed at 1 MiB
(MALLOC_MMAP_THRESHOLD_): every buffer of 1 MiB or more is then handed back to the OS when freed, so
the peak is what the live tensors need, and it repeats to 0.1 MB. Under glibc's default a run's peak
moves by about 100 MB with how the heap happened to be reused (edora at batch 4 measured 1,259 and
1,365 MB in two identical runs), more than the differences measured here. The steps are slower so:
this benchmark measures memory only (benchmarks/throughput.py and train_step.py measure speed). The
last line printed is one JSON object with the peaks and their ratios.

    python benchmarks/train_memory.py [--rows N] [--workdir DIR]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from peers import smollm2_workdir, train_peer
from throughput import LR, RANK, SEQ_LEN, run_qsvd, write_rows

BATCHES = (4, 8)
RUNS = ["lora", "edora", "dora", "qdora"]
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def child(args) -> None:
    if args.child == "qdora":
        outcome, _ = train_peer(True, model=args.model, rank=RANK, data=args.data, seq_len=SEQ_LEN,
                                batch_size=args.batch_size, epochs=1, lr=LR)
        figures = {"peak_mb": outcome.train_peak_memory_mb}
    else:
        figures = run_qsvd(args.child, "auto", args, args.batch_size)
    print(json.dumps(figures))


def measure(name: str, batch_size: int, args, work: Path) -> float:
    command = [sys.executable, __file__, "--child", name, "--batch-size", str(batch_size),
               "--model", args.model, "--data", args.data]
    print(f"running {name} at batch {batch_size} ...", file=sys.stderr, flush=True)
    log = work / f"{name}-{batch_size}.log"
    with open(log, "w") as stderr:
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env=os.environ | FIXED_MMAP_THRESHOLD)
    if result.returncode != 0:
        sys.exit(f"{name} failed (exit {result.returncode}); its log:\n{log.read_text()[-3000:]}")
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
    print(f"  peak {peak:,.1f} MB", file=sys.stderr, flush=True)
    return peak


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
        peaks = {(name, batch): measure(name, batch, args, work) for batch in BATCHES for name in RUNS}
    summary = {}
    print(f"\n{'batch':<7}" + "".join(f"{name + ' MB':>12}" for name in RUNS) + f"{'edora ÷ lora':>14}{'dora ÷ qdora':>14}")
    for batch in BATCHES:
        edora, dora = (peaks["edora", batch] / peaks["lora", batch], peaks["dora", batch] / peaks["qdora", batch])
        print(f"{batch:<7}" + "".join(f"{peaks[name, batch]:>12,.1f}" for name in RUNS) + f"{edora:>14.3f}{dora:>14.3f}")
        summary |= {f"{name}_batch{batch}_peak_mb": round(peaks[name, batch], 1) for name in RUNS}
        summary |= {f"edora_vs_lora_batch{batch}_peak": round(edora, 3), f"dora_vs_qdora_batch{batch}_peak": round(dora, 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
