"""How faithfully each method's export reproduces the trained 4-bit model, on SmolLM2-135M-Instruct.

Every method is trained briefly at bits 4 (rank 16 on all seven projections, the built-in
arithmetic data) and exported three ways; each export is loaded the standard way and its
next-token distributions on held-out prompts are compared with the trained qsvd model's:
- PEFT: `PeftModel.from_pretrained(original base, adapter)`, float32;
- merged into the original weights, bf16 (what `qsvd export --format merged` writes by default);
- merged into the dequantized weights, bf16 (`--base dequantized`).
The yardstick is the peer's own gap: PEFT's QLoRA base, the NF4 copy of the original weights,
against the original model. An export on the original base can do no better than that, since
the adapter was trained against the quantized base; the ratio says how close it comes.
Figures: mean KL(trained ‖ export) per token, top-1 agreement, largest |Δ log-probability|.
The last line printed is one JSON object.

    python benchmarks/export_fidelity.py [--quick] [--steps 8] [--workdir DIR] [--methods ...]
"""

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

from peers import TARGETS, write_smollm2

METHODS = ["lora", "dora", "pissa", "milora", "loraxs", "edora", "lorasb"]
LR = {"lorasb": 1e-4}  # LoRA-SB's math rate: its init is one step of full fine-tuning at this rate
PROMPTS = 16


def prompt_batch(tokenizer):
    """Held-out word problems (another seed than the training rows), padded into one batch."""
    from qsvd.data import synthetic_arithmetic

    questions = list(synthetic_arithmetic(PROMPTS, seed=999)["question"])
    return tokenizer(questions, return_tensors="pt", padding=True)


def distributions(model, batch):
    """Log-probabilities at every real (non-pad) position, in float32."""
    import torch

    with torch.no_grad():
        logits = model.eval()(**batch).logits.float()
    return torch.log_softmax(logits[batch["attention_mask"].bool()], dim=-1)


def compare(reference, other) -> dict:
    """KL(reference ‖ other) per token, top-1 agreement and the largest logit gap (log-prob gap)."""
    kl = (reference.exp() * (reference - other)).sum(-1).mean().item()
    agree = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
    return {"kl": kl, "top1": agree, "max_gap": (reference - other).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="edora and milora only, 2 steps")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--workdir", help="where to keep the model and runs; default: a temp dir")
    args = parser.parse_args()
    methods = args.methods or (["edora", "milora"] if args.quick else METHODS)
    steps = 2 if args.quick else args.steps

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import qsvd
    from qsvd.load import load_tokenizer, resolve_model
    from qsvd.split import quantized_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        os.environ["QSVD_CACHE"] = str(work / "cache")
        model_dir = work / "smollm2"
        write_smollm2(model_dir)
        tokenizer = load_tokenizer(resolve_model(str(model_dir)))  # with a pad token
        batch = prompt_batch(tokenizer)
        original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        reference = distributions(original, batch)
        peer_base = distributions(quantized_model(resolve_model(str(model_dir)), 4, "cpu", progress=False), batch)
        yardstick = compare(reference, peer_base)
        results = {}
        for method in methods:
            print(f"{method}: training {steps} steps ...", file=sys.stderr, flush=True)
            run_dir = work / f"run-{method}"
            trained = qsvd.finetune(model=str(model_dir), method=method, bits=4, rank=16, targets=TARGETS,
                                    max_steps=steps, batch_size=2, seq_len=256, lr=LR.get(method),
                                    output=str(run_dir), overwrite=True).model
            ours = distributions(trained, batch)
            del trained
            exports = {"peft": PeftModel.from_pretrained(copy.deepcopy(original),
                                                         qsvd.export(run_dir, work / f"{method}-peft", overwrite=True))}
            for base in ("original", "dequantized"):
                path = qsvd.export(run_dir, work / f"{method}-{base}", format="merged", base=base, overwrite=True)
                exports[f"merged {base}"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            results[method] = {name: compare(ours, distributions(model, batch)) for name, model in exports.items()}

    print(f"\nSmolLM2-135M-Instruct, 4-bit NF4 base, rank 16, {steps} steps; {int(batch['attention_mask'].sum())} "
          f"prompt tokens. Yardstick, PEFT's NF4 base vs the original model: KL {yardstick['kl']:.2e}, "
          f"top-1 {100 * yardstick['top1']:.1f}%")
    print(f"{'method':<8}{'export':<20}{'KL':>10}{'KL / NF4 base':>15}{'top-1':>8}{'max |Δ log p|':>14}")
    summary = {"yardstick_kl": yardstick["kl"]}
    for method, figures in results.items():
        for name in ("peft", "merged original", "merged dequantized"):
            f = figures[name]
            print(f"{method:<8}{name:<20}{f['kl']:>10.2e}{f['kl'] / yardstick['kl']:>15.3g}"
                  f"{100 * f['top1']:>7.1f}%{f['max_gap']:>14.3f}")
        for name, key in (("peft", "peft"), ("merged dequantized", "dequantized")):
            summary[f"{method}_{key}_kl_ratio"] = float(f"{figures[name]['kl'] / yardstick['kl']:.3g}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
