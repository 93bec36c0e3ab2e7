"""Peak memory of a merged export: qsvd's shard-by-shard merge (and GGUF export) against PEFT's merge_and_unload.

One 4-bit edora run (1 step) on a Llama-architecture checkpoint with random weights (bf16
safetensors: TinyLlama-1.1B's shape with SmolLM2's vocabulary, or 0.3B with --quick) is exported as a PEFT DoRA adapter;
then, each in a fresh process, the same adapter is merged into the original bf16 weights:
- peer (PEFT): `from_pretrained` (bf16) → `PeftModel.from_pretrained` → `merge_and_unload` →
  `save_pretrained`, which holds the whole 16-bit model;
- qsvd: `qsvd export --format merged --dtype bf16`, at the default 1 GB shards and at 256 MB, and
  `qsvd export --format gguf` (f16), which writes one tensor at a time.
Peak memory is the process's peak RSS (VmHWM); "imports" is its RSS before any work. The two
merged checkpoints are compared tensor by tensor. The last line printed is one JSON object.

    python benchmarks/export_memory.py [--quick] [--workdir DIR]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from init_memory import SHAPES
from seven_b import write_random_llama

from qsvd.memory import status_mb

SMALL_SHARDS = "256MB"
VOCAB = 49152  # SmolLM2's, as in the figures in the README


def parameter_count(model: Path) -> int:
    from safetensors import safe_open

    return sum(math.prod(f.get_slice(name).get_shape()) for shard in model.glob("*.safetensors")
               for f in [safe_open(shard, "pt")] for name in f.keys())


def make_run(model: Path, work: Path) -> Path:
    """A 1-step edora run at 4 bits (randomized top-r SVD), and its PEFT export."""
    import qsvd

    os.environ["QSVD_CACHE"] = str(work / "cache")
    if not (work / "run").is_dir():
        qsvd.finetune(model=str(model), method="edora", bits=4, rank=16, svd_niter=2, max_steps=1,
                      batch_size=1, seq_len=256, lr=1e-2, output=str(work / "run"))
    return qsvd.export(work / "run", work / "peft", overwrite=True)


def merge_with_peft(model: str, adapter: str, output: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(output, max_shard_size="1GB")


def child(args) -> None:
    """Run one merge and print its figures as JSON; the baseline is taken after every import."""
    import peft
    import transformers

    import qsvd

    assert peft and transformers  # imported before the baseline is taken
    baseline = status_mb("VmRSS")
    start = time.perf_counter()
    if args.child == "peft":
        merge_with_peft(args.model, args.adapter, args.output)
    elif args.child.startswith("gguf-"):
        qsvd.export(args.run, f"{args.output}.gguf", format="gguf", gguf_type=args.child.removeprefix("gguf-"),
                    overwrite=True)
    else:
        qsvd.export(args.run, args.output, format="merged", dtype="bf16", shard_size=args.child, overwrite=True)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": status_mb("VmHWM"), "baseline_mb": baseline}))


def measure(who: str, work: Path, model: Path) -> dict:
    command = [sys.executable, __file__, "--child", who, "--model", model, "--run", work / "run",
               "--adapter", work / "peft", "--output", work / f"merged-{who}"]
    print(f"merging with {who} ...", file=sys.stderr, flush=True)
    env = os.environ | {"QSVD_CACHE": str(work / "cache")}
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"{who} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def largest_difference(first: Path, second: Path) -> tuple[float, float]:
    """The largest |difference| between the two checkpoints' tensors, and the largest |weight|."""
    from safetensors import safe_open

    def tensors(path: Path) -> dict:
        return {name: shard for shard in path.glob("*.safetensors") for name in safe_open(shard, "pt").keys()}

    ours, theirs = tensors(first), tensors(second)
    assert ours.keys() == theirs.keys(), "the two merged checkpoints hold different tensors"
    gap = scale = 0.0
    for name in ours:
        a = safe_open(ours[name], "pt").get_tensor(name).float()
        b = safe_open(theirs[name], "pt").get_tensor(name).float()
        gap, scale = max(gap, (a - b).abs().max().item()), max(scale, b.abs().max().item())
    return gap, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 0.3B model instead of 1.2B")
    parser.add_argument("--workdir", help="where to write (and keep) the model and run; default: a temp dir")
    for hidden in ("--child", "--model", "--run", "--adapter", "--output"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model = work / ("llama-0.3b" if args.quick else "llama-1.2b")
        write_random_llama(model, SHAPES["quick" if args.quick else "full"] | {"vocab_size": VOCAB})
        params = parameter_count(model)
        make_run(model, work)
        figures = {who: measure(who, work, model) for who in ("peft", "1GB", SMALL_SHARDS, "gguf-f16")}
        gap, scale = largest_difference(work / "merged-1GB", work / "merged-peft")

    model_mb = params * 2 / 2**20
    print(f"\n{params / 1e9:.2f}B-parameter Llama, bf16 model {model_mb:,.0f} MB; edora rank 16 merged into the original weights")
    print(f"{'path':<42}{'peak RSS MB':>12}{'(imports MB)':>14}{'work / model':>14}{'seconds':>10}")
    names = {"peft": "PEFT: load + merge_and_unload + save", "1GB": "qsvd export --format merged (1GB shards)",
             SMALL_SHARDS: f"qsvd export, --shard-size {SMALL_SHARDS}", "gguf-f16": "qsvd export --format gguf (f16)"}
    for who, name in names.items():
        f = figures[who]
        print(f"{name:<42}{f['peak_mb']:>12,.0f}{f['baseline_mb']:>14,.0f}"
              f"{(f['peak_mb'] - f['baseline_mb']) / model_mb:>14.2f}{f['seconds']:>10.1f}")
    print(f"largest |qsvd − PEFT| over all merged weights: {gap:.3g} (largest |weight| {scale:.3g})")
    peer, ours, small, gguf = figures["peft"], figures["1GB"], figures[SMALL_SHARDS], figures["gguf-f16"]
    print(json.dumps({"params": params, "model_mb": round(model_mb),
                      "qsvd_peak_mb": round(ours["peak_mb"]), "qsvd_small_shards_peak_mb": round(small["peak_mb"]),
                      "peer_peak_mb": round(peer["peak_mb"]),
                      "mem_ratio": round(ours["peak_mb"] / peer["peak_mb"], 3),
                      "small_shards_mem_ratio": round(small["peak_mb"] / peer["peak_mb"], 3),
                      "time_ratio": round(ours["seconds"] / peer["seconds"], 3),
                      "gguf_peak_mb": round(gguf["peak_mb"]),
                      "gguf_mem_ratio": round(gguf["peak_mb"] / peer["peak_mb"], 3),
                      "gguf_time_ratio": round(gguf["seconds"] / peer["seconds"], 3),
                      "max_weight_gap": gap}))


if __name__ == "__main__":
    main()
