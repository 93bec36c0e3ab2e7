"""The benchmark scripts run end to end (slow: only with --run-slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def last_json_line(args, tmp_path):
    result = subprocess.run([sys.executable, *map(str, args), "--workdir", tmp_path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_llama7b_memory_runs_on_a_small_shape(tmp_path):
    figures = last_json_line([BENCHMARKS / "llama7b_memory.py", "--shape", "tiny", "--steps", 2], tmp_path)
    assert figures["shape"] == "tiny" and figures["train_peak_mb"] > 0 and figures["median_step_s"] > 0


@pytest.mark.slow
def test_train_step_quick_reports_the_ratios(tmp_path):
    figures = last_json_line([BENCHMARKS / "train_step.py", "--quick", "--methods", "edora,milora,lorasb"], tmp_path)
    for key in ["edora_vs_qdora_time", "edora_vs_qlora_mem", "lorasb_vs_qlora_mem", "milora_vs_qlora_time"]:
        assert figures[key] > 0, key
