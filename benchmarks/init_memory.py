"""Peak memory and time to prepare a 4-bit PiSSA model: qsvd's streaming init against PEFT's path.

- peer (PEFT): load the whole model in bf16, apply PEFT's PiSSA init (`pissa_niter_N`, a
  randomized SVD), then quantize each residual base layer to NF4 with bitsandbytes;
- qsvd pissa: `qsvd.init(method="pissa", svd_niter=N)`: each layer is read, split, quantized
  and written to the prepared-model cache in turn;
- qsvd milora: the same with MiLoRA's exact bottom-r split (no peer has one);
- qsvd reuse: `qsvd.finetune` (one step) that reuses pissa's prepared model. Its setup time, from
  the start to the first training step, is set against one plain read of the prepared files; both
  start from the disk (the files are dropped from the page cache first).

The model is a Llama-architecture checkpoint with random weights, written here as sharded
bf16 safetensors: 1.1B parameters (TinyLlama-1.1B's shape), or 0.2B with --quick. Each path
runs in a fresh process; peak memory is its peak RSS (VmHWM) and, on a GPU, its peak
torch.cuda.max_memory_allocated. The last line printed is one JSON object. Targets at 1.1B:
time_ratio ≤ 1.0 and mem_ratio ≤ 0.35 (qsvd pissa against PEFT), reuse_ratio ≤ 1.1.

    python benchmarks/init_memory.py [--quick] [--rank 16] [--niter 4] [--workdir DIR]
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

from peers import TARGETS
from seven_b import write_random_llama

from qsvd.memory import status_mb

SHARD_BYTES = 200 * 2**20  # the source model's shards
SHAPES = {  # TinyLlama-1.1B, and a small one for --quick
    "full": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    "quick": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=32000),
}


def write_model(path: Path, shape: dict) -> int:
    """A random-weight Llama with a tokenizer, as bf16 shards; returns its parameter count."""
    from safetensors import safe_open

    write_random_llama(path, shape, SHARD_BYTES)
    total = 0
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def run_qsvd(model: str, method: str, rank: int, niter: int) -> None:
    import qsvd

    qsvd.init(model=model, method=method, rank=rank, bits=4, targets=TARGETS,
              svd_niter=niter if method == "pissa" else None)


def run_reuse(model: str, rank: int, niter: int) -> float:
    """`qsvd finetune` on pissa's prepared model for one step; its setup seconds (start to first step)."""
    import qsvd

    with tempfile.TemporaryDirectory() as out:
        summary = qsvd.finetune(model=model, method="pissa", rank=rank, bits=4, targets=TARGETS, svd_niter=niter,
                                max_steps=1, batch_size=1, seq_len=128, save_steps=None, output=f"{out}/run")
    return summary.setup_seconds


def run_peft(model: str, rank: int, niter: int) -> None:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, device_map=device)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=f"pissa_niter_{niter}")
    peft_model = get_peft_model(base, config)
    for module in peft_model.modules():  # quantize each residual W − B A to NF4
        if isinstance(module, LoraLinear):
            linear = module.base_layer
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True,
                                          quant_type="nf4", device="meta")
            quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)
            module.base_layer = quantized.to(device)
            del linear


def child(args) -> None:
    """Run one path and print its figures as JSON."""
    import torch

    os.environ["QSVD_CACHE"] = args.cache
    baseline = status_mb("VmRSS")
    start = time.perf_counter()
    figures = {}
    if args.child == "peft":
        run_peft(args.model, args.rank, args.niter)
    elif args.child == "reuse":
        figures["setup_seconds"] = run_reuse(args.model, args.rank, args.niter)
    else:
        run_qsvd(args.model, args.child, args.rank, args.niter)
    figures |= {"seconds": time.perf_counter() - start, "peak_mb": status_mb("VmHWM"), "baseline_mb": baseline}
    if torch.cuda.is_available():
        figures["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(figures))


def measure(path: Path, who: str, cache: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", who, "--model", str(path), "--cache", str(cache),
               "--rank", str(args.rank), "--niter", str(args.niter)]
    print(f"running {who} ...", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{who} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache, so that the next read comes from the disk."""
    from qsvd.files import prefetch

    prefetch(paths, os.POSIX_FADV_DONTNEED)


def read_seconds(paths: list[Path]) -> float:
    """The time to read the files once, from the disk."""
    evict(paths)
    start = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while f.read(1 << 24):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 0.2B model instead of 1.1B")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--niter", type=int, default=4, help="power iterations of both randomized SVDs")
    parser.add_argument("--workdir", help="where to write (and keep) the random model; default: a temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.workdir or tmp) / ("llama-0.2b" if args.quick else "llama-1.1b")
        params = write_model(path, SHAPES["quick" if args.quick else "full"])
        caches = {who: Path(tmp) / f"cache-{who}" for who in ("peft", "pissa", "milora")}
        peer = measure(path, "peft", caches["peft"], args)
        pissa = measure(path, "pissa", caches["pissa"], args)
        milora = measure(path, "milora", caches["milora"], args)
        # a finetune that reuses pissa's prepared model, and one read of that model's files, both from the disk
        prepared = sorted(caches["pissa"].glob("prepared/*/*"))
        prepared_mb = sum(f.stat().st_size for f in prepared) / 2**20
        read_s = read_seconds(prepared)
        evict(prepared + sorted(path.iterdir()))
        reuse = measure(path, "reuse", caches["pissa"], args)

    print(f"\n{params / 1e9:.2f}B-parameter Llama, rank {args.rank}, 4-bit NF4, randomized SVD niter {args.niter}")
    print(f"{'path':<34}{'peak RSS MB':>12}{'(imports MB)':>14}{'GPU peak MB':>13}{'seconds':>10}")
    for name, figures in [("PEFT: bf16 load + PiSSA + NF4", peer), ("qsvd init pissa (streaming)", pissa),
                          ("qsvd init milora (exact, streaming)", milora)]:
        print(f"{name:<34}{figures['peak_mb']:>12,.0f}{figures['baseline_mb']:>14,.0f}"
              f"{figures.get('gpu_peak_mb', float('nan')):>13,.0f}{figures['seconds']:>10.1f}")
    print(f"qsvd finetune reusing pissa's prepared model ({prepared_mb:,.0f} MB): setup (start to first step) "
          f"{reuse['setup_seconds']:.2f} s; reading its files once from the disk {read_s:.2f} s")
    summary = {"params": params, "qsvd_peak_mb": round(pissa["peak_mb"]), "peer_peak_mb": round(peer["peak_mb"]),
               "mem_ratio": round(pissa["peak_mb"] / peer["peak_mb"], 3),
               "qsvd_s": round(pissa["seconds"], 1), "peer_s": round(peer["seconds"], 1),
               "time_ratio": round(pissa["seconds"] / peer["seconds"], 3),
               "milora_peak_mb": round(milora["peak_mb"]), "milora_mem_ratio": round(milora["peak_mb"] / peer["peak_mb"], 3),
               "milora_s": round(milora["seconds"], 1),
               "prepared_mb": round(prepared_mb), "prepared_read_s": round(read_s, 2),
               "reuse_setup_s": round(reuse["setup_seconds"], 2),
               "reuse_ratio": round(reuse["setup_seconds"] / read_s, 3)}
    if "gpu_peak_mb" in peer:
        summary |= {"qsvd_gpu_peak_mb": round(pissa["gpu_peak_mb"]), "peer_gpu_peak_mb": round(peer["gpu_peak_mb"]),
                    "gpu_mem_ratio": round(pissa["gpu_peak_mb"] / peer["gpu_peak_mb"], 3)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
