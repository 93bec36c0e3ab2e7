"""`qsvd plan` on this CPU against the measured peak of real runs: SmolLM2-135M, a grid of methods and batch × seq shapes.

Each point is a `qsvd finetune` of `--steps` steps in a fresh process, on rows whose answers fill
--seq-len (every token supervised, as the plan assumes), and a `qsvd plan` with the same options in
another. Each run splits its model afresh (in a cache of its own, which shares only the converted
embedded model), so its peak includes the split, as a user's first run does. Prints a line a point and, last, one JSON object: each point's measured and
planned MiB with their ratio, and `plan_error_max` (the largest |planned − measured| / measured).
Target: plan_error_max ≤ 0.15.

    python benchmarks/plan_accuracy.py [--points edora:8x512,lora:4x256,...] [--steps 2] [--workdir DIR]
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ("edora", "lora", "loraxs")
SHAPES = ("1x256", "2x512", "4x256", "8x256", "4x512", "8x512")  # batch × seq
TARGET_PLAN_ERROR = 0.15
WORDS = "alpha beta gamma delta river stone cloud seven eleven market garden window yellow quiet".split()
ROWS = 16


def write_full_rows(path: Path, seq_len: int) -> None:
    """Rows whose answers fill --seq-len, as the plan assumes: every token supervised."""
    from qsvd.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    rng = random.Random(0)
    with open(path, "w") as file:
        for i in range(ROWS):
            ids = tokenizer(" ".join(rng.choice(WORDS) for _ in range(seq_len)), add_special_tokens=False)["input_ids"]
            file.write(json.dumps({"instruction": f"Write word list {i}.",
                                   "output": tokenizer.decode(ids[:seq_len - 40])}) + "\n")


def clean_env(cache: Path) -> dict[str, str]:
    """Nothing a caller left in os.environ reaches the measured processes, but the cache."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR", "LANG") if key in os.environ}
    return env | {"QSVD_CACHE": str(cache)}


def measure(method: str, shape: str, steps: int, workdir: Path) -> dict:
    batch, seq = shape.split("x")
    rows = workdir / f"rows-{seq}.jsonl"
    if not rows.is_file():
        write_full_rows(rows, int(seq))
    cache = workdir / f"cache-{method}-{shape}"  # a prepared model of its own: the run splits
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    (cache / "models").symlink_to(Path(os.environ.get("QSVD_CACHE", "~/.cache/qsvd")).expanduser() / "models")
    options = ["--method", method, "--batch-size", batch, "--seq-len", seq]
    output = workdir / f"run-{method}-{shape}"
    subprocess.run([sys.executable, "-m", "qsvd", "finetune", *options, "--data", str(rows), "--max-steps", str(steps),
                    "--output", str(output), "--overwrite"], env=clean_env(cache), check=True, capture_output=True)
    measured = json.loads((output / "qsvd_config.json").read_text())["peak_memory_mb"]
    plan = subprocess.run([sys.executable, "-m", "qsvd", "plan", *options], env=clean_env(cache), check=True,
                          capture_output=True, text=True).stderr
    planned = float(re.search(r"peak\s+([\d,]+) MiB", plan).group(1).replace(",", ""))
    shutil.rmtree(cache)  # 200 MB a point
    return dict(method=method, shape=shape, measured_mib=round(measured), planned_mib=round(planned),
                planned_vs_measured=round(planned / measured, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=",".join(f"{m}:{s}" for m in METHODS for s in SHAPES),
                        help="method:BATCHxSEQ, comma-separated (default: every method on every shape)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from qsvd.load import resolve_model

    resolve_model("smollm2-135m")  # converts the embedded GGUF's config once, outside the measured runs
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    points = []
    for point in args.points.split(","):
        method, shape = point.split(":")
        points.append(measure(method, shape, args.steps, workdir))
        figures = points[-1]
        print(f"{method:<7}{shape:>6}  measured {figures['measured_mib']:>6,} MiB  planned {figures['planned_mib']:>6,} MiB"
              f"  planned ÷ measured {figures['planned_vs_measured']:.3f}", flush=True)
    error = max(abs(point["planned_vs_measured"] - 1) for point in points)
    print(json.dumps({"points": points, "plan_error_max": round(error, 3), "target": TARGET_PLAN_ERROR}))


if __name__ == "__main__":
    main()
