"""The benchmark scripts: run end to end (slow: only with --run-slow), and the quality report writer."""

import importlib
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
def test_seven_b_runs_every_phase_on_a_small_shape_and_resumes(tmp_path):
    figures = last_json_line([BENCHMARKS / "seven_b.py", "--shape", "tiny"], tmp_path)
    assert figures["shape"] == "tiny" and all(figures[f"{phase}_peak_mb"] > 0 for phase in ("init", "train", "export"))
    assert (tmp_path / "merged" / "config.json").is_file() and figures["plan_error_max"] >= 0
    again = last_json_line([BENCHMARKS / "seven_b.py", "--shape", "tiny"], tmp_path)  # every phase measured before
    measured = [f"{phase}_{what}" for phase in ("init", "train", "export") for what in ("peak_mb", "s")]
    assert [again[key] for key in measured] == [figures[key] for key in measured]


@pytest.mark.slow
def test_chunked_loss_holds_less_of_the_logits(tmp_path):
    figures = last_json_line([BENCHMARKS / "chunked_loss.py", "--seq-len", "1024"], tmp_path)
    assert figures["chunk_tokens"] == 261 and figures["whole_logits_mb"] > figures["chunked_logits_mb"]


@pytest.mark.slow
def test_train_step_quick_reports_the_ratios(tmp_path):
    figures = last_json_line([BENCHMARKS / "train_step.py", "--quick", "--methods", "edora,milora,lorasb"], tmp_path)
    for key in ["edora_vs_qdora_time", "edora_vs_qlora_mem", "lorasb_vs_qlora_mem", "milora_vs_qlora_time"]:
        assert figures[key] > 0, key


@pytest.mark.slow
def test_quality_quick_scores_every_method(tmp_path):
    figures = last_json_line([BENCHMARKS / "quality.py", "--quick"], tmp_path)
    for name in ["base", "milora", "edora", "lorasb", "loraxs", "pissa", "qlora"]:
        assert 0 <= figures[f"gsm8k_{name}_acc"] <= 1, name
    assert (tmp_path / "quality.md").is_file() and (tmp_path / "quality.png").is_file()


@pytest.mark.slow
def test_export_memory_quick_merges_like_peft_in_less_memory(tmp_path):
    figures = last_json_line([BENCHMARKS / "export_memory.py", "--quick"], tmp_path)
    assert figures["max_weight_gap"] < 1e-2  # the same merged weights as PEFT's, up to bf16 rounding
    assert 0 < figures["small_shards_mem_ratio"] <= figures["mem_ratio"] and figures["time_ratio"] > 0


@pytest.mark.slow
def test_export_fidelity_quick_compares_every_export(tmp_path):
    figures = last_json_line([BENCHMARKS / "export_fidelity.py", "--quick"], tmp_path)
    for method in ("edora", "milora"):
        assert figures[f"{method}_dequantized_kl_ratio"] < 0.05 < figures[f"{method}_peft_kl_ratio"]


def test_quality_report_writes_table_plot_and_summary(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    quality = importlib.import_module("quality")
    run = dict(lr=None, trainable=0, final_loss=None, train_s=0.0, correct=40, examples=100, accuracy=0.4,
               ci95=[0.309, 0.498], perplexity=20.0)
    results = {"boolq": {"base": run,
                         "milora": run | dict(lr=3e-4, trainable=4_884_480, final_loss=0.5, train_s=61.0, correct=55,
                                              accuracy=0.55, ci95=[0.452, 0.644], perplexity=21.5),
                         "qlora": run | dict(lr=2e-4, trainable=4_884_480, final_loss=0.6, train_s=70.0, correct=50,
                                             accuracy=0.5, ci95=[0.404, 0.596], perplexity=20.25)}}
    summary = quality.write_report(results, quality.BUDGETS["full"], tmp_path)
    assert summary == {"boolq_base_acc": 0.4, "boolq_milora_acc": 0.55, "boolq_milora_dppl": 1.5,
                       "boolq_qlora_acc": 0.5, "boolq_qlora_dppl": 0.25}
    table = (tmp_path / "quality.md").read_text()
    assert "| milora | 0.0003 | 4,884,480 | 55.0% | 45.2–64.4% | +15.0 | 21.500 | +1.500 | 0.5000 | 61 |" in table
    assert "| PEFT QLoRA | 0.0002 | 4,884,480 | 50.0% | 40.4–59.6% | +10.0 | 20.250 | +0.250 | 0.6000 | 70 |" in table
    assert "| base | – | 0 | 40.0% | 30.9–49.8% | – | 20.000 | – | – | 0 |" in table
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "quality.json").read_text())["results"] == results
