"""A Llama-2-7B-shaped model fine-tuned end to end on this machine, phase by phase, against `qsvd plan`.

Writes a random-weight Llama-2-7B (vocab 32,000, untied; bf16 safetensors shards written tensor by
tensor, so the 16-bit model is never in memory) with a byte-level BPE tokenizer trained on qsvd's
built-in rows, then runs the CLI as a user would, each phase in a fresh process:

    qsvd init     --method edora --rank 16 --svd-niter 4
    qsvd finetune (the same split, reusing the prepared model) --max-steps 2 --batch-size 1 --seq-len 256
    qsvd export   --format merged

Each phase's peak memory is its process's peak RSS (the child's ru_maxrss; this parent never imports
torch, so a child starts small); `qsvd plan`'s prediction for each phase on this machine is computed
in a process of its own. The last line printed is one JSON object with
`init_peak_mb`, `train_peak_mb`, `export_peak_mb`, `plan_error_max` (largest |plan − measured| /
measured) and the phases' times. Targets: every peak ≤ 8,192 MiB; plan_error_max ≤ 0.15.

Resumable: the model, the prepared model (in WORKDIR/cache) and every finished phase's figures
(WORKDIR/phases.json) are kept, so a rerun picks up where the last one stopped; `--redo PHASE`
measures a phase again. About 30 GB of disk for the 7B shape; `--shape tiny` runs the same code on a
2-block model in a minute.

    python benchmarks/seven_b.py [--shape 7b|tiny] [--workdir DIR] [--redo init,train,export]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
}
SETUP = dict(method="edora", bits=4, rank=16)  # the split, shared by init, finetune and the plan
TRAINING = dict(batch_size=1, seq_len=256)  # with gradient checkpointing, qsvd's default
PHASES = ("init", "train", "export")
TARGET_MIB, TARGET_PLAN_ERROR = 8192, 0.15
SHARD_BYTES = 2 * 2**30
TOKENIZER_VOCAB = 4096  # byte-level BPE on the built-in rows: random weights need no better


def write_random_llama(path: Path, shape: dict, shard_bytes: int = SHARD_BYTES, tokenizer: Path | None = None) -> None:
    """A random-weight (std 0.02) untied Llama as bf16 shards, one tensor in memory at a time, with
    `tokenizer`'s tokenizer (default: one trained here); config.json is written last, so a directory
    that has it is complete. The weights are drawn on the GPU where there is one (a 7B model's in
    seconds rather than minutes)."""
    if (path / "config.json").is_file():
        return
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with init_empty_weights():
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    weight_map, shard, pending_bytes = {}, {}, 0

    def flush():
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard.clear()

    for number, (name, size) in enumerate(shapes.items(), 1):
        shard[name] = (torch.ones(size) if name.endswith("norm.weight")
                       else torch.randn(size, generator=generator, device=device) * 0.02).to(torch.bfloat16).cpu()
        pending_bytes += shard[name].numel() * 2
        if pending_bytes >= shard_bytes:
            print(f"  wrote {number} of {len(shapes)} tensors", file=sys.stderr, flush=True)
            flush()
            pending_bytes = 0
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (AutoTokenizer.from_pretrained(tokenizer) if tokenizer else train_tokenizer()).save_pretrained(path)
    config.save_pretrained(path)


def train_tokenizer():
    """A byte-level BPE tokenizer learnt from qsvd's built-in arithmetic rows."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qsvd.data import synthetic_arithmetic

    rows = synthetic_arithmetic(2000, seed=1)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(list(rows["question"]) + list(rows["answer"]), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_data(path: Path, rows: int = 8, answers: int = 12) -> None:
    """Rows of one built-in word problem and `answers` answers, longer than --seq-len (finetune cuts
    the answers to it, so that every row fills it)."""
    from qsvd.data import synthetic_arithmetic

    problems = synthetic_arithmetic(rows * answers, seed=0)
    with open(path, "w") as out:
        for start in range(0, len(problems), answers):
            chunk = problems[start:start + answers]
            out.write(json.dumps({"question": chunk["question"][0], "answer": "\n".join(chunk["answer"])}) + "\n")


def phase_commands(work: Path, model: Path) -> dict[str, list[str]]:
    qsvd = [sys.executable, "-m", "qsvd"]
    split = ["--model", str(model), "--method", SETUP["method"], "--bits", str(SETUP["bits"]),
             "--rank", str(SETUP["rank"]), "--svd-niter", "4"]
    return {
        "init": qsvd + ["init", *split],
        "train": qsvd + ["finetune", *split, "--data", str(work / "data.jsonl"), "--truncate", "--max-steps", "2",
                         "--batch-size", str(TRAINING["batch_size"]), "--seq-len", str(TRAINING["seq_len"]),
                         "--output", str(work / "run"), "--overwrite"],
        "export": qsvd + ["export", str(work / "run"), "--format", "merged", "--output", str(work / "merged"),
                          "--overwrite"],
    }


def run_phase(name: str, command: list[str], env: dict) -> dict:
    """Run one phase in a fresh process (its output shown as it goes); its peak RSS and wall time."""
    print(f"\n== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{name} failed with exit code {process.returncode}")
    return {"peak_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - start}


def child(what: str, work: Path, shape: str) -> None:
    """In a process of its own: write the model, or print the plan of each phase as JSON (MiB)."""
    model = work / f"llama-{shape}"
    if what == "write":
        write_random_llama(model, SHAPES[shape])
        write_data(work / "data.jsonl")
        return
    from qsvd.plan import Setup, budget

    parts = budget(Setup(model=str(model), **SETUP, **TRAINING))
    print(json.dumps({"init": parts["init total"] / 2**20, "train": parts["training total"] / 2**20,
                      "export": parts["export total"] / 2**20}))


def run_child(what: str, work: Path, shape: str) -> str:
    result = subprocess.run([sys.executable, __file__, "--child", what, "--workdir", str(work), "--shape", shape],
                            stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{what} failed with exit code {result.returncode}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="7b")
    parser.add_argument("--workdir", help="where the model, the cache and the figures are kept "
                                          "(default: ~/.cache/qsvd/benchmarks/seven_b-SHAPE)")
    parser.add_argument("--redo", default="", help="comma-separated phases to measure again")
    parser.add_argument("--child", choices=["write", "plan"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    default_work = Path.home() / ".cache" / "qsvd" / "benchmarks" / f"seven_b-{args.shape}"
    work = Path(args.workdir or default_work).resolve()
    if args.child:
        return child(args.child, work, args.shape)
    redo = {phase for phase in args.redo.split(",") if phase}
    if redo - set(PHASES):
        parser.error(f"--redo takes phases among {', '.join(PHASES)}")

    work.mkdir(parents=True, exist_ok=True)
    model = work / f"llama-{args.shape}"
    if not (model / "config.json").is_file():
        print(f"writing the random {args.shape} model to {model} ...", file=sys.stderr, flush=True)
    run_child("write", work, args.shape)
    env = os.environ | {"QSVD_CACHE": str(work / "cache")}
    results_file = work / "phases.json"
    measured = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if "train" in redo:
        redo.add("export")  # it exports the run that training writes
    for name, command in phase_commands(work, model).items():
        if name in measured and name not in redo:
            print(f"{name}: measured before ({results_file}); --redo {name} to measure again", file=sys.stderr)
            continue
        if name == "init" and (work / "cache" / "prepared").is_dir():
            shutil.rmtree(work / "cache" / "prepared")  # so that init splits, not reuses
        measured[name] = run_phase(name, command, env)
        results_file.write_text(json.dumps(measured, indent=2))
    planned = json.loads(run_child("plan", work, args.shape).strip().splitlines()[-1])

    print(f"\nLlama-2-7B shape ({args.shape}), edora rank 16, 4-bit NF4; batch 1 × seq 256, 2 steps")
    print(f"{'phase':<8}{'peak RSS MiB':>14}{'plan MiB':>10}{'error':>8}{'seconds':>10}")
    errors = {}
    for name in PHASES:
        peak, plan = measured[name]["peak_mb"], planned[name]
        errors[name] = (plan - peak) / peak
        print(f"{name:<8}{peak:>14,.0f}{plan:>10,.0f}{errors[name]:>+8.1%}{measured[name]['seconds']:>10.1f}")
    figures = {"shape": args.shape, **{f"{name}_peak_mb": round(measured[name]["peak_mb"]) for name in PHASES},
               **{f"{name}_plan_mb": round(planned[name]) for name in PHASES},
               **{f"{name}_s": round(measured[name]["seconds"], 1) for name in PHASES},
               "plan_error_max": round(max(abs(error) for error in errors.values()), 3)}
    figures["met"] = (max(figures[f"{name}_peak_mb"] for name in PHASES) <= TARGET_MIB and
                      figures["plan_error_max"] <= TARGET_PLAN_ERROR)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
