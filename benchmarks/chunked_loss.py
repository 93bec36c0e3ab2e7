"""The logits' share of a training step's peak, with the chunked cross-entropy and without.

A Llama-3-shaped small model (vocabulary 128,256, hidden 512, 4 blocks, grouped-query attention;
random bf16 weights) trains 3 steps of `qsvd finetune` (edora, 4-bit, rank 16, batch 1, rows of
plain text that fill `--seq-len 2048`, every token supervised), each way in a fresh process:
- chunked: qsvd's loss, the head and cross-entropy over `loss.chunk_tokens` tokens at a time (261);
- whole: the same loss with the chunk made larger than the batch, i.e. all 2,048 tokens' logits
  at once, as before chunking (and as the model's own loss, which holds every position's);
- floor: the loss replaced by one on the decoder's hidden states, no head at all: the step's
  peak without any logits.
The peak is the training phase's peak RSS (CPU) or what torch's allocator held plus the paged
optimizer state (GPU), from the run record. The logits' share of a peak is that peak above the floor. Target: the whole share
÷ the chunked share ≥ 4. The last line printed is one JSON object.

    python benchmarks/chunked_loss.py [--seq-len 2048] [--workdir DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from seven_b import write_random_llama

SHAPE = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=128256, max_position_embeddings=8192)
MODES = ("chunked", "whole", "floor")
TARGET_RATIO = 4.0


def write_text_rows(path: Path, rows: int = 3) -> None:
    """Rows of plain text (every token carries loss) longer than any --seq-len here; cut to it."""
    from qsvd.data import synthetic_arithmetic

    problems = synthetic_arithmetic(rows * 200, seed=0)
    with open(path, "w") as out:
        for start in range(0, len(problems), 200):
            chunk = problems[start:start + 200]
            text = "\n".join(f"{q} {a}" for q, a in zip(chunk["question"], chunk["answer"]))
            out.write(json.dumps({"text": text}) + "\n")


def floor_loss(model, inputs, num_items=None):
    """A loss on the decoder's hidden states alone: the same step without any vocabulary logits."""
    hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
    return hidden.last_hidden_state.float().pow(2).mean()


def child(mode: str, work: Path, seq_len: int) -> None:
    """One 3-step run in this process; prints its training peak and median step time as JSON."""
    import qsvd
    from qsvd import loss, train

    if mode == "whole":
        loss.LOGIT_CHUNK_BYTES = 2**62  # one chunk of every supervised token
    elif mode == "floor":
        train.supervised_loss = floor_loss
    output = work / f"run-{mode}"
    qsvd.finetune(model=str(work / "model"), method="edora", bits=4, rank=16, batch_size=1, seq_len=seq_len,
                  truncate=True, data=str(work / "rows.jsonl"), max_steps=3, output=str(output), overwrite=True,
                  svd_niter=2)
    record = json.loads((output / "qsvd_config.json").read_text())
    print(json.dumps({"peak_mb": record["train_peak_memory_mb"], "step_s": record["median_step_seconds"]}))


def measure(mode: str, work: Path, seq_len: int) -> dict:
    print(f"running {mode} ...", file=sys.stderr, flush=True)
    result = subprocess.run([sys.executable, __file__, "--child", mode, "--workdir", str(work),
                             "--seq-len", str(seq_len)], stdout=subprocess.PIPE, text=True,
                            env=os.environ | {"QSVD_CACHE": str(work / "cache")})
    if result.returncode != 0:
        sys.exit(f"{mode} failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--workdir", help="where to keep the model and the runs; default: a temp dir")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, Path(args.workdir), args.seq_len)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        write_random_llama(work / "model", SHAPE)
        write_text_rows(work / "rows.jsonl")
        figures = {mode: measure(mode, work, args.seq_len) for mode in MODES}

    from qsvd.loss import chunk_tokens

    floor = figures["floor"]["peak_mb"]
    share = {mode: figures[mode]["peak_mb"] - floor for mode in ("chunked", "whole")}
    print(f"\nvocabulary 128,256, batch 1 × {args.seq_len} supervised tokens, chunks of "
          f"{chunk_tokens(SHAPE['vocab_size'])} tokens")
    print(f"{'loss':<10}{'training peak MiB':>18}{'logits share MiB':>18}{'step s':>8}")
    for mode in MODES:
        print(f"{mode:<10}{figures[mode]['peak_mb']:>18,.0f}{share.get(mode, 0):>18,.0f}{figures[mode]['step_s']:>8.2f}")
    summary = {"seq_len": args.seq_len, "chunk_tokens": chunk_tokens(SHAPE["vocab_size"]),
               **{f"{mode}_peak_mb": round(figures[mode]["peak_mb"]) for mode in MODES},
               **{f"{mode}_step_s": round(figures[mode]["step_s"], 2) for mode in MODES},
               "whole_logits_mb": round(share["whole"]), "chunked_logits_mb": round(share["chunked"]),
               "logits_share_ratio": round(share["whole"] / max(share["chunked"], 1), 2),
               "peak_ratio": round(figures["chunked"]["peak_mb"] / figures["whole"]["peak_mb"], 3),
               "step_time_ratio": round(figures["chunked"]["step_s"] / figures["whole"]["step_s"], 3)}
    summary["met"] = summary["logits_share_ratio"] >= TARGET_RATIO
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
