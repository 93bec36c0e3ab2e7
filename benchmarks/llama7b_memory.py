"""Peak GPU memory of 4-bit EDoRA training on a Llama-2-7B-shaped model (target ≤ 5.0 GB).

Writes a Llama-2-7B config (with SmolLM2's 49152-token vocabulary, for its tokenizer) with random
weights (std 0.02) as bf16 safetensors shards, tensor by tensor (nothing is downloaded, and the
16-bit model is never in memory), then runs
`qsvd.finetune` on it: edora, 4-bit NF4, rank 16 on all seven projections, seq 1024, batch 1,
gradient checkpointing on, a few steps. Reports torch.cuda.max_memory_allocated for the whole run
and for the training phase alone. Needs a CUDA GPU and about 14 GB of disk for the weights;
`--shape tiny` runs the same path on a small model, on any machine, as a check of the script.

    python benchmarks/llama7b_memory.py [--workdir DIR] [--steps 5] [--shape 7b|tiny]
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

VOCAB = 49152  # the embedded SmolLM2 tokenizer's; Llama-2's 32000 would make the embeddings 140 MB smaller
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=VOCAB, max_position_embeddings=4096),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=4096),
}
SEQ_LEN, SHARD_BYTES = 1024, 2 * 2**30


def write_random_llama(path: Path, shape: dict) -> None:
    """A random-weight Llama as bf16 shards, one tensor in memory at a time, plus a tokenizer."""
    if (path / "config.json").is_file():
        return
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from qsvd.load import load_tokenizer, resolve_model

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    with init_empty_weights():
        names = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    index, shard, shard_bytes = {}, {}, 0

    def flush():
        file = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
        shard.clear()

    for name, size in names.items():
        shard[name] = (torch.ones(size) if name.endswith("norm.weight")
                       else torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
            shard_bytes = 0
    if shard:
        flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(path)
    load_tokenizer(resolve_model("smollm2-135m"), False).save_pretrained(path)  # any tokenizer serves random weights


def write_data(path: Path, rows: int) -> None:
    """Long built-in word problems, so that rows come close to SEQ_LEN tokens."""
    from qsvd.data import synthetic_arithmetic

    problems = synthetic_arithmetic(rows * 12, seed=0)
    with open(path, "w") as out:
        for start in range(0, len(problems), 12):
            chunk = problems[start:start + 12]
            out.write(json.dumps({"question": " ".join(chunk["question"]), "answer": "\n".join(chunk["answer"])}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="7b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workdir", help="where to keep the random model; default: a temp dir")
    args = parser.parse_args()

    import torch

    import qsvd

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        os.environ["QSVD_CACHE"] = str(work / "cache")
        model, data = work / f"llama-{args.shape}", work / "data.jsonl"
        write_random_llama(model, SHAPES[args.shape])
        write_data(data, rows=8)
        run = qsvd.finetune(model=str(model), method="edora", bits=4, rank=16, seq_len=SEQ_LEN, batch_size=1,
                            max_steps=args.steps, data=str(data), svd_niter=4, output=str(work / "run"),
                            overwrite=True)
        record = json.loads((work / "run" / "qsvd_config.json").read_text())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (peak RSS)"
    print(json.dumps({"shape": args.shape, "device": device, "peak_mb": round(run.peak_memory_mb),
                      "train_peak_mb": round(record["train_peak_memory_mb"]),
                      "setup_peak_mb": round(record["setup_peak_memory_mb"]),
                      "median_step_s": round(record["median_step_seconds"], 3),
                      "target_mb": 5000,  # judged only for the 7B shape on a GPU
                      "met": run.peak_memory_mb <= 5000 if args.shape == "7b" and torch.cuda.is_available() else None}))


if __name__ == "__main__":
    main()
