"""DPO on Anthropic HH (harmless-base): qsvd's lora, milora, edora and lorasb against TRL's
DPOTrainer on PEFT QLoRA built the standard way, side by side.

The pairs are ../shared/data/hh_harmless/train.jsonl, read in place: those whose two rows fit in
--seq-len tokens (rendered with the model's chat template), of which a dev split of --dev pairs is
carved with a fixed seed, and the first --pairs of the rest train. Every run trains SmolLM2-135M
(the embedded model) with a 4-bit NF4 base, rank 16 on all seven projections, β = 0.1, batch 4
pairs, gradient checkpointing and paged 8-bit AdamW; each is a fresh process:
- qsvd, `--objective dpo`, each method, over all --pairs pairs; then `qsvd eval --task pref` on
  dev: how often the implicit reward β(π − π_ref) of the chosen response beats the rejected one's
  (π_ref: the run's start), with a Wilson interval, and the mean margin;
- TRL's `DPOTrainer` (its reference: the adapter disabled, each step) on the same rows as
  prompt/chosen/rejected conversations, --peer-steps steps, for the step time;
- the base model at 4 bits, for dev's accuracy before: how often the chosen response has the
  higher log-likelihood per token (a plain model has no reference to reward against).
Figures: the median step time, and the peak of live tensor bytes in training (a torch dispatch
mode over `Trainer.train`, the CPU's `max_memory_allocated`; in separate runs of --memory-steps
steps, as it slows the steps). The last line printed is one JSON object.

    python benchmarks/preference.py [--pairs N] [--dev N] [--workdir DIR]    (about 2 hours here)
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from peers import SHARED_DATA, TARGETS, child_figures, peer_model, smollm2_workdir

RANK, PAIRS_A_BATCH, BETA, SEED = 16, 4, 0.1, 0
# each method's DPO lr: their SFT defaults but lora's (2e-4 barely moved its rewards in 40 steps: 1e-3)
METHODS = {"lora": 1e-3, "milora": 3e-4, "edora": 2e-3, "lorasb": 2e-3}


def carve(args, work: Path) -> None:
    """train.jsonl and dev.jsonl in `work`: the HH pairs that qsvd keeps at --seq-len (both rows fit,
    the responses differ and are not empty), dev carved with SEED."""
    from qsvd.data import pair_conversations, tokenize
    from qsvd.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model), False)

    def fits(row: dict) -> bool:
        conversations = pair_conversations(row)
        return not isinstance(conversations, str) and all(
            messages[-1]["content"] and len(tokenize(messages, tokenizer)["input_ids"]) <= args.seq_len
            for messages in conversations.values())

    rows = [json.loads(line) for line in open(SHARED_DATA / "hh_harmless" / "train.jsonl")]
    fit = [row for row in rows if fits(row)]
    print(f"HH harmless-base: {len(fit)} of {len(rows)} pairs fit in {args.seq_len} tokens", file=sys.stderr)
    random.Random(SEED).shuffle(fit)
    for name, part in (("dev", fit[:args.dev]), ("train", fit[args.dev:args.dev + args.pairs])):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))


def run_qsvd(method: str, args, memory: bool) -> dict:
    import qsvd
    from qsvd.memory import count_live_tensors_in_training

    tensors = count_live_tensors_in_training() if memory else {}
    with tempfile.TemporaryDirectory() as output:
        qsvd.finetune(model=args.model, method=method, objective="dpo", beta=BETA, rank=RANK, bits=4, targets=TARGETS,
                      data=str(args.work / "train.jsonl"), seq_len=args.seq_len, batch_size=PAIRS_A_BATCH,
                      lr=METHODS[method], save_steps=None, output=output, overwrite=True,
                      max_steps=args.memory_steps if memory else None)
        record = json.loads((Path(output) / "qsvd_config.json").read_text())
        figures = {"step_s": record["median_step_seconds"]} | tensors
        if not memory:
            result = qsvd.evaluate(output, args.work / "dev.jsonl", task="pref", seq_len=args.seq_len,
                                   predictions=Path(output) / "dev.jsonl")
            figures |= preference_figures(result, Path(output) / "dev.jsonl")
    return figures


def preference_figures(result, predictions: Path) -> dict:
    """Accuracy with its Wilson interval, the mean margin with its bootstrap interval, and (from the
    same log-likelihoods) how often the chosen response has the higher log-likelihood per token."""
    rows = [json.loads(line) for line in open(predictions)]
    per_token = sum(r["chosen_logp"] / r["chosen_tokens"] > r["rejected_logp"] / r["rejected_tokens"] for r in rows)
    summary = result.summary()
    return {"accuracy": summary["accuracy"], "ci95": summary["ci95"], "margin": result.margin,
            "margin_ci95": result.margin_ci95, "per_token_accuracy": per_token / len(rows), "pairs": len(rows)}


def run_base(args) -> dict:
    import qsvd

    with tempfile.TemporaryDirectory() as output:
        predictions = Path(output) / "dev.jsonl"
        result = qsvd.evaluate(args.model, args.work / "dev.jsonl", task="pref", bits=4, seq_len=args.seq_len,
                               predictions=predictions)
        return preference_figures(result, predictions)


def run_trl(args, memory: bool) -> dict:
    """TRL's DPOTrainer, configured as its docs show, on the peer model (the reference: its adapter disabled)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from qsvd.data import pair_conversations
    from qsvd.devices import default_device
    from qsvd.load import load_tokenizer, resolve_model
    from qsvd.memory import count_live_tensors_in_training
    from qsvd.train import StepClock

    tensors = count_live_tensors_in_training() if memory else {}
    pairs = []
    for line in open(args.work / "train.jsonl"):
        conversations = pair_conversations(json.loads(line))
        prompt = conversations["chosen_"][:-1]
        pairs.append({"prompt": prompt, "chosen": conversations["chosen_"][-1:],
                      "rejected": conversations["rejected_"][-1:]})
    clock = StepClock()
    with tempfile.TemporaryDirectory() as work:
        config = DPOConfig(output_dir=work, per_device_train_batch_size=PAIRS_A_BATCH, learning_rate=METHODS["lora"],
                           beta=BETA, max_steps=args.memory_steps if memory else args.peer_steps, max_length=args.seq_len,
                           gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                           optim="paged_adamw_8bit", report_to="none", save_strategy="no", logging_steps=1, seed=42,
                           use_cpu=default_device().type == "cpu", dataloader_num_workers=0)
        trainer = DPOTrainer(model=peer_model(args.model, RANK), args=config, train_dataset=datasets.Dataset.from_list(pairs),
                             processing_class=load_tokenizer(resolve_model(args.model), False), callbacks=[clock])
        trainer.train()
    return {"step_s": statistics.median(clock.step_seconds), "steps": len(clock.step_seconds)} | tensors


def child(args) -> None:
    name, _, kind = args.child.partition(":")
    memory = kind == "memory"
    figures = run_base(args) if name == "base" else run_trl(args, memory) if name == "trl" else run_qsvd(name, args, memory)
    print(json.dumps(figures))


def measure(name: str, args) -> dict:
    command = [sys.executable, __file__, "--child", name, "--model", args.model, "--workdir", args.work,
               "--seq-len", args.seq_len, "--peer-steps", args.peer_steps, "--memory-steps", args.memory_steps]
    print(f"running {name} ...", file=sys.stderr, flush=True)
    figures = child_figures(name, command, args.work / f"{name.replace(':', '-')}.log")
    print(f"  {name}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    return figures


def report(results: dict) -> dict:
    base, trl = results["base"], results["trl"]
    summary = {"lora_vs_trl_step_time": round(results["lora"]["step_s"] / trl["step_s"], 3),
               "lora_vs_trl_peak_memory": round(results["lora:memory"]["tensor_peak_mb"] /
                                                results["trl:memory"]["tensor_peak_mb"], 3),
               "trl_step_s": round(trl["step_s"], 3), "trl_peak_mb": round(results["trl:memory"]["tensor_peak_mb"], 1),
               "dev_pairs": base["pairs"], "base_accuracy": round(base["accuracy"], 3),
               "base_ci95": [round(x, 3) for x in base["ci95"]]}
    print(f"\n{'run':<8}{'step s':>8}{'÷ TRL':>7}{'dev acc':>9}{'95% CI':>14}{'margin':>9}{'per-token acc':>15}")
    print(f"{'base':<8}{'':>15}{base['accuracy']:>9.3f}{'%.3f–%.3f' % tuple(base['ci95']):>14}{'':>9}"
          f"{base['per_token_accuracy']:>15.3f}")
    for method in METHODS:
        run = results[method]
        low, high = run["ci95"]
        print(f"{method:<8}{run['step_s']:>8.2f}{run['step_s'] / trl['step_s']:>7.3f}{run['accuracy']:>9.3f}"
              f"{'%.3f–%.3f' % (low, high):>14}{run['margin']:>9.4f}{run['per_token_accuracy']:>15.3f}")
        summary |= {f"{method}_step_s": round(run["step_s"], 3), f"{method}_accuracy": round(run["accuracy"], 3),
                    f"{method}_ci95": [round(low, 3), round(high, 3)], f"{method}_margin": round(run["margin"], 4),
                    f"{method}_per_token_accuracy": round(run["per_token_accuracy"], 3),
                    f"{method}_above_base_separately": low > base["ci95"][1]}
    summary["qsvd_lora_peak_mb"] = round(results["lora:memory"]["tensor_peak_mb"], 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=480, help="training pairs (default 480: 120 steps)")
    parser.add_argument("--dev", type=int, default=500, help="dev pairs (default 500)")
    parser.add_argument("--seq-len", type=int, default=192, help="longest row in tokens (default 192)")
    parser.add_argument("--peer-steps", type=int, default=5, help="TRL's steps, for its step time (default 5)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each memory run (default 3)")
    parser.add_argument("--workdir", help="where to keep the model copy, the pairs and prepared models; default: a temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.work = Path(args.workdir)
        return child(args)
    with smollm2_workdir(args.workdir) as work:
        args.work, args.model = work, str(work / "smollm2-135m")
        carve(args, work)
        results = {name: measure(name, args) for name in ["base", "trl", "trl:memory", "lora:memory", *METHODS]}
        print(json.dumps(report(results)))


if __name__ == "__main__":
    main()
