"""GGUF export of a SmolLM2-135M-Instruct run: time, peak memory and fidelity, beside the peer's merge.

One 4-bit edora run (rank 16, 2 steps) on the embedded model (as bf16 safetensors, which both stacks
read) is exported, each export in a fresh process:
- peer (PEFT): `from_pretrained` → `PeftModel.from_pretrained` → `merge_and_unload` → `save_pretrained`,
  the step before llama.cpp's converter (PEFT writes no GGUF);
- qsvd: `--format merged` (bf16), and `--format gguf` at every --gguf-type (the k-quants q6_k, q5_k_m
  and q4_k_m only where llama-cpp-python is installed: llama.cpp makes them).
Peak memory is the process's peak RSS (VmHWM), time its wall time. Fidelity: each GGUF, loaded back
by transformers (`gguf_file=`, float32), against the fp32 merge into the same original weights, on
held-out prompts: mean KL per token, top-1 agreement, largest |Δ log-probability|; and its size,
its bits a weight (8 × size ÷ the model's weights), and a llama-7b file's size at that type from its
tensor shapes. (SmolLM2's width, 576, is no multiple of the k-quants' 256-weight blocks: llama.cpp
stores those rows in its fallback types, q5_0, q5_1 and q8_0, so SmolLM2's k-quant files are larger
than a 7B model's bits a weight suggest.) Where llama-cpp-python is installed, llama.cpp's greedy
tokens are compared with transformers' on the f16 file. The last line printed is one JSON object.

The embedded SmolLM2 ships as a q4_1 GGUF: its weights lie on q4_1's grid (its embedding on q8_0's),
so --gguf-type q4_1 re-quantizes them almost exactly and the other types' figures include moving
them onto another grid. For figures from a model stored in 16 bits, pass --model DIR.

    python benchmarks/export_gguf.py [--types f16,q8_0,...] [--model DIR] [--workdir DIR]
"""

import argparse
import json
import os
import tempfile
from itertools import islice
from pathlib import Path

from export_fidelity import compare, distributions, prompt_batch
from export_memory import measure
from peers import write_smollm2

# llama-7b's 2-D tensors by llama.cpp's name: (count, rows, columns); its 1-D norms are 65 × 4,096 f32
LLAMA_7B = {"token_embd": (1, 32000, 4096), "output": (1, 32000, 4096), "attn_q": (32, 4096, 4096),
            "attn_k": (32, 4096, 4096), "attn_v": (32, 4096, 4096), "attn_output": (32, 4096, 4096),
            "ffn_gate": (32, 11008, 4096), "ffn_up": (32, 11008, 4096), "ffn_down": (32, 4096, 11008)}
# llama.cpp's k-quant mixes (llama_tensor_get_type): the output in q6_k; attn_v and ffn_down in q6_k in
# the blocks that use_more_bits picks (16 of 32: the first and last 4, and every third between)
K_QUANT_MIXES = {"q6_k": ("Q6_K", "Q6_K"), "q5_k_m": ("Q5_K", "Q6_K"), "q4_k_m": ("Q4_K", "Q6_K")}


def llama_7b_gb(gguf_type: str) -> float:
    """A llama-7b GGUF's size at this type, from its tensor shapes: qsvd's own types put every 2-D
    tensor in the type; llama.cpp's k-quants mix types as it does."""
    import gguf

    def nbytes(type_name: str, weights: int) -> float:
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
        return weights / block * block_bytes

    size = 65 * 4096 * 4  # the norms, f32
    for role, (count, rows, columns) in LLAMA_7B.items():
        weights = count * rows * columns
        if gguf_type not in K_QUANT_MIXES:
            size += nbytes(gguf_type.upper(), weights)
            continue
        base, more = K_QUANT_MIXES[gguf_type]
        share = 1.0 if role == "output" else 16 / 32 if role in ("attn_v", "ffn_down") else 0.0
        size += nbytes(more, share * weights) + nbytes(base, (1 - share) * weights)
    return size / 1e9


def default_types() -> str:
    """Every --gguf-type that this machine can make (the k-quants: with llama-cpp-python)."""
    from importlib.util import find_spec

    from qsvd.export_gguf import EXPORT_TYPES, GGUF_TYPES

    return ",".join(EXPORT_TYPES if find_spec("llama_cpp") else GGUF_TYPES)


def llama_cpp_agreement(gguf: Path, transformers_model, prompt: list[int], tokens: int = 32) -> dict | None:
    """llama.cpp against transformers on the same file: how many of transformers' greedy tokens (at most
    `tokens`, to the end of the answer) llama.cpp generates before the first difference, and, fed
    transformers' greedy sequence, the share of positions where their next tokens agree (None without
    llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np
    import torch

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, verbose=False)
    with torch.no_grad():  # greedy up to `tokens`, or to the end of the answer
        sequence = transformers_model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False)
        expected = transformers_model(sequence).logits[0].argmax(-1).numpy()
    answer = sequence[0, len(prompt):].tolist()
    generated = list(islice(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), len(answer)))
    same = next((i for i, (a, b) in enumerate(zip(generated, answer)) if a != b), len(answer))
    llm.reset()
    llm.eval(sequence[0].tolist())
    theirs = np.asarray(llm.scores[:sequence.shape[1]]).argmax(-1)
    return {"greedy_prefix": same, "greedy_tokens": len(answer),
            "next_token_agreement": float((theirs == expected).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where to keep the model, run and exports; default: a temp dir")
    parser.add_argument("--types", help="comma-separated --gguf-type values (default: every one this machine makes)")
    parser.add_argument("--model", help="a model directory (safetensors) instead of the embedded SmolLM2")
    args = parser.parse_args()
    gguf_types = (args.types or default_types()).split(",")

    import torch
    from transformers import AutoModelForCausalLM

    import qsvd
    from qsvd.data import render_prompt, tokenize_prompt
    from qsvd.load import load_tokenizer, resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        os.environ["QSVD_CACHE"] = str(work / "cache")
        model_dir = Path(args.model) if args.model else work / "smollm2"
        if not args.model:
            write_smollm2(model_dir)
        if not (work / "run").is_dir():
            qsvd.finetune(model=str(model_dir), method="edora", bits=4, rank=16, max_steps=2, batch_size=2,
                          seq_len=256, output=str(work / "run"))
        qsvd.export(work / "run", work / "peft", overwrite=True)
        figures = {who: measure(who, work, model_dir) for who in ("peft", "1GB", *(f"gguf-{t}" for t in gguf_types))}

        tokenizer = load_tokenizer(resolve_model(str(model_dir)))
        batch = prompt_batch(tokenizer)
        full = qsvd.export(work / "run", work / "merged-fp32", format="merged", dtype="fp32", overwrite=True)
        full_model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)
        reference, weights = distributions(full_model, batch), sum(p.numel() for p in full_model.parameters())
        fidelity, agreement = {}, None
        for gguf_type in gguf_types:
            path = work / f"merged-gguf-{gguf_type}.gguf"
            model = AutoModelForCausalLM.from_pretrained(work, gguf_file=path.name, dtype=torch.float32).eval()
            fidelity[gguf_type] = compare(reference, distributions(model, batch))
            fidelity[gguf_type]["size_mb"] = path.stat().st_size / 2**20
            fidelity[gguf_type] |= {"bits": 8 * path.stat().st_size / weights, "7b_gb": llama_7b_gb(gguf_type)}
            if gguf_type == "f16":
                question = render_prompt([{"role": "user", "content": "What is 12 + 30?"}], tokenizer)
                agreement = llama_cpp_agreement(path, model, tokenize_prompt(question, tokenizer))
            del model

    peer = figures["peft"]
    print(f"\n{args.model or 'SmolLM2-135M-Instruct'}, edora rank 16 (2 steps) merged into the original weights")
    print(f"{'path':<44}{'peak RSS MB':>12}{'seconds':>10}{'peak / peer':>13}")
    names = {"peft": "PEFT: load + merge_and_unload + save (bf16)", "1GB": "qsvd export --format merged (bf16)",
             **{f"gguf-{t}": f"qsvd export --format gguf --gguf-type {t}" for t in gguf_types}}
    for who, name in names.items():
        f = figures[who]
        print(f"{name:<44}{f['peak_mb']:>12,.0f}{f['seconds']:>10.1f}{f['peak_mb'] / peer['peak_mb']:>13.3f}")
    print(f"\n{'GGUF (read by transformers)':<30}{'MB':>8}{'bits/w':>8}{'7B GB':>7}{'KL':>11}{'top-1':>8}"
          f"{'max |Δ log p|':>15}")
    for gguf_type, f in fidelity.items():
        print(f"{gguf_type:<30}{f['size_mb']:>8.1f}{f['bits']:>8.2f}{f['7b_gb']:>7.2f}"
              f"{f['kl']:>11.2e}{100 * f['top1']:>7.1f}%{f['max_gap']:>15.4f}")
    if agreement is not None:
        print(f"llama.cpp on the f16 file: its greedy tokens are transformers' for the first "
              f"{agreement['greedy_prefix']} of {agreement['greedy_tokens']}; fed transformers' sequence, "
              f"the same next token at {100 * agreement['next_token_agreement']:.1f}% of positions")
    summary = {"peer_peak_mb": round(peer["peak_mb"]), "peer_s": round(peer["seconds"], 2),
               "merged_peak_mb": round(figures["1GB"]["peak_mb"])}
    for gguf_type in gguf_types:
        f = figures[f"gguf-{gguf_type}"]
        summary |= {f"{gguf_type}_peak_mb": round(f["peak_mb"]), f"{gguf_type}_s": round(f["seconds"], 2),
                    f"{gguf_type}_mem_ratio": round(f["peak_mb"] / peer["peak_mb"], 3),
                    f"{gguf_type}_time_ratio": round(f["seconds"] / peer["seconds"], 3),
                    f"{gguf_type}_kl": float(f"{fidelity[gguf_type]['kl']:.3g}"),
                    f"{gguf_type}_top1": round(fidelity[gguf_type]["top1"], 4),
                    f"{gguf_type}_max_logp_gap": round(fidelity[gguf_type]["max_gap"], 4),
                    f"{gguf_type}_mb": round(fidelity[gguf_type]["size_mb"], 1),
                    f"{gguf_type}_bits": round(fidelity[gguf_type]["bits"], 2),
                    f"{gguf_type}_7b_gb": round(fidelity[gguf_type]["7b_gb"], 2)}
    summary["llama_cpp"] = agreement
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
