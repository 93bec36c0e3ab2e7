"""Throughput on real rows: one epoch of GSM8K, qsvd's batchings against TRL's SFTTrainer, side by side.

Every run trains SmolLM2-135M (the embedded model, written here once as safetensors) with a 4-bit
NF4 frozen base, rank 16 on all seven projections, batch 8, rows of at most 512 tokens, gradient
checkpointing and paged 8-bit AdamW, over the same first --rows rows of ../shared/data/gsm8k, loss
on the answers only:
- qsvd, lora and edora, with each --batching: padded, grouped, padding-free, packed;
- TRL's `SFTTrainer` on PEFT QLoRA built the standard way (benchmarks/peers.py), with the same rows
  as prompt/completion conversations: padded, `padding_free`, and `packing` (best-fit decreasing).

Each run is a fresh process. Figures: supervised tokens per second of training (the answers'
tokens, counted once for all runs, over the wall time of `trainer.train`), and the peak memory of
training (peak RSS on CPU; on a GPU torch's reserved memory plus the paged optimizer state). The
last line printed is one JSON object: each run's figures and the ratios the README's targets name.

    python benchmarks/throughput.py [--quick] [--rows N] [--workdir DIR]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from peers import SHARED_DATA, TARGETS, child_figures, peer_model, smollm2_workdir

RANK, BATCH, SEQ_LEN, LR = 16, 8, 512, 2e-4
QSVD_BATCHINGS = ["padded", "grouped", "padding-free", "packed"]
TRL_MODES = {"trl-padded": {}, "trl-padding_free": {"padding_free": True, "max_length": None},  # rows fit: no cut
             "trl-packing": {"packing": True, "packing_strategy": "bfd"}}
METHODS = ["lora", "edora"]


def write_rows(path: Path, rows: int) -> None:
    """The first `rows` GSM8K training rows (question/answer), read in place from ../shared/data."""
    with open(SHARED_DATA / "gsm8k" / "train.jsonl") as source, open(path, "w") as out:
        for _, line in zip(range(rows), source):
            out.write(line)


def supervised_tokens(model: str, data: str) -> int:
    """The tokens that carry loss in one epoch: each row's answer and end of turn, as qsvd tokenizes it."""
    from qsvd.data import IGNORE_INDEX, tokenize_rows, training_rows
    from qsvd.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model), False)
    rows = tokenize_rows(training_rows(data), tokenizer, SEQ_LEN).rows
    return sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in rows["labels"])


def run_qsvd(method: str, batching: str, args, batch_size: int = BATCH) -> dict:
    import qsvd

    with tempfile.TemporaryDirectory() as output:
        qsvd.finetune(model=args.model, method=method, rank=RANK, bits=4, targets=TARGETS, data=args.data,
                      seq_len=SEQ_LEN, batch_size=batch_size, epochs=1, lr=LR, batching=batching, save_steps=None,
                      output=output, overwrite=True)
        record = json.loads((Path(output) / "qsvd_config.json").read_text())
    return {"seconds": record["train_seconds"], "peak_mb": record["train_peak_memory_mb"]}


def run_trl(mode: str, args) -> dict:
    """TRL's SFTTrainer, configured as its docs show, on the peer model."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from qsvd.devices import default_device
    from qsvd.load import load_tokenizer, resolve_model
    from qsvd.memory import peak_memory_mb, reset_peak_memory, return_freed_memory

    rows = [json.loads(line) for line in open(args.data)]
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": row["question"]}],
                                           "completion": [{"role": "assistant", "content": row["answer"]}]}
                                          for row in rows])
    model = peer_model(args.model, RANK)
    device = default_device()
    with tempfile.TemporaryDirectory() as work:
        config = SFTConfig(output_dir=work, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                           optim="paged_adamw_8bit", report_to="none", save_strategy="no", logging_steps=1, seed=42,
                           use_cpu=device.type == "cpu", dataloader_num_workers=0,
                           **{"max_length": SEQ_LEN} | TRL_MODES[mode])
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                             processing_class=load_tokenizer(resolve_model(args.model), False))
        return_freed_memory(collect=True)
        reset_peak_memory(device)
        start = time.perf_counter()
        trainer.train()
        return {"seconds": time.perf_counter() - start, "peak_mb": peak_memory_mb(device)}


def child(args) -> None:
    if args.child in TRL_MODES:
        figures = run_trl(args.child, args)
    else:
        method, batching = args.child.split(":")
        figures = run_qsvd(method, batching, args)
    print(json.dumps(figures))


def measure(name: str, args, work: Path) -> dict:
    command = [sys.executable, __file__, "--child", name, "--model", args.model, "--data", args.data]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    log = work / f"{name.replace(':', '-')}.log"
    figures = child_figures(name, command, log)
    figures["tokens_per_s"] = args.tokens / figures["seconds"]
    print(f"  {name}: {figures['seconds']:.1f} s, {figures['tokens_per_s']:.1f} tokens/s, "
          f"peak {figures['peak_mb']:,.0f} MB", file=sys.stderr, flush=True)
    return figures


def report(results: dict[str, dict], default: str) -> dict:
    trl_best = max(TRL_MODES, key=lambda name: results[name]["tokens_per_s"])
    print(f"\n{'run':<22}{'tokens/s':>10}{'÷ padded':>10}{'÷ TRL best':>12}{'peak MB':>10}{'÷ TRL best':>12}")
    summary = {"supervised_tokens": results.pop("tokens"), "trl_best": trl_best, "default_batching": default}
    for name, figures in results.items():
        padded = results.get(name.split(":")[0] + ":padded", results["trl-padded"])
        speed, memory = figures["tokens_per_s"], figures["peak_mb"]
        print(f"{name:<22}{speed:>10.1f}{speed / padded['tokens_per_s']:>10.3f}"
              f"{speed / results[trl_best]['tokens_per_s']:>12.3f}{memory:>10,.0f}"
              f"{memory / results[trl_best]['peak_mb']:>12.3f}")
        summary[f"{name}_tokens_per_s"] = round(speed, 1)
        summary[f"{name}_peak_mb"] = round(memory)
    for method in METHODS:
        ours = results[f"{method}:{default}"]
        summary[f"{method}_default_vs_padded_speed"] = round(
            ours["tokens_per_s"] / results[f"{method}:padded"]["tokens_per_s"], 3)
        summary[f"{method}_default_vs_trl_best_speed"] = round(ours["tokens_per_s"] / results[trl_best]["tokens_per_s"], 3)
        summary[f"{method}_default_vs_trl_best_peak"] = round(ours["peak_mb"] / results[trl_best]["peak_mb"], 3)
        summary[f"{method}_default_vs_trl_lowest_peak"] = round(
            ours["peak_mb"] / min(results[name]["peak_mb"] for name in TRL_MODES), 3)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="GSM8K rows, one epoch (default 32: 4 steps)")
    parser.add_argument("--quick", action="store_true", help="32 rows, and qsvd's lora for padded and the default only")
    parser.add_argument("--workdir", help="where to keep the model copy, data and prepared models; default: a temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from qsvd.batching import choose
    from qsvd.devices import compute_dtype, default_device

    device = default_device()
    default = choose("auto", device, compute_dtype(device), "sdpa").name  # SmolLM2 loads on sdpa
    with smollm2_workdir(args.workdir) as work:
        args.model, args.data = str(work / "smollm2-135m"), str(work / "gsm8k.jsonl")
        write_rows(Path(args.data), 32 if args.quick else args.rows)
        args.tokens = supervised_tokens(args.model, args.data)
        runs = ([f"{method}:{batching}" for method in METHODS for batching in QSVD_BATCHINGS] if not args.quick else
                ["lora:padded", "edora:padded", f"lora:{default}", f"edora:{default}"])
        runs = list(dict.fromkeys(runs)) + list(TRL_MODES)
        results = {name: measure(name, args, work) for name in runs} | {"tokens": args.tokens}
        print(f"{args.tokens:,} supervised tokens a run; {torch.get_num_threads()} threads; default: {default}",
              file=sys.stderr)
        summary = report(results, default)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
