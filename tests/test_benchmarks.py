"""The benchmark scripts: run end to end (slow: only with --run-slow), and the quality report writer."""

import importlib
import json
import math
from types import SimpleNamespace

import pytest

from conftest import BENCHMARKS, last_json_line

SHARED_DATA = BENCHMARKS.parent.parent / "shared" / "data"


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
def test_init_memory_quick_reports_time_memory_and_reuse(tmp_path):
    figures = last_json_line([BENCHMARKS / "init_memory.py", "--quick"], tmp_path)
    assert 0 < figures["mem_ratio"] < 1 and 0 < figures["milora_mem_ratio"] < 1 and figures["time_ratio"] > 0
    assert figures["prepared_mb"] > 0 and figures["reuse_setup_s"] > figures["prepared_read_s"] > 0


@pytest.mark.slow
def test_train_step_quick_reports_the_ratios(tmp_path):
    figures = last_json_line([BENCHMARKS / "train_step.py", "--quick", "--methods", "edora,milora,lorasb"], tmp_path)
    for key in ["edora_vs_qdora_time", "edora_vs_qlora_mem", "lorasb_vs_qlora_mem", "milora_vs_qlora_time"]:
        assert figures[key] > 0, key


@pytest.mark.slow
def test_throughput_quick_compares_the_default_batching_with_padded_and_trl(tmp_path):
    pytest.importorskip("trl", reason="the benchmark extras: pip install -e '.[bench]'")
    figures = last_json_line([BENCHMARKS / "throughput.py", "--quick"], tmp_path)
    assert figures["default_batching"] == "padding-free" and figures["supervised_tokens"] > 0
    for method in ("lora", "edora"):
        for key in ("default_vs_padded_speed", "default_vs_trl_best_speed", "default_vs_trl_best_peak"):
            assert figures[f"{method}_{key}"] > 0, key


@pytest.mark.slow
def test_train_memory_compares_edora_with_lora_and_dora_with_qdora(tmp_path):
    figures = last_json_line([BENCHMARKS / "train_memory.py", "--rows", "8"], tmp_path)
    for batch in (4, 8):
        for figure in ("tensor_peak_mb", "peak_mb"):
            assert all(figures[f"{name}_batch{batch}_{figure}"] > 0 for name in ("lora", "edora", "dora", "qdora"))
        for ratio in ("tensor_peak", "peak"):
            assert figures[f"edora_vs_lora_batch{batch}_{ratio}"] > 0 < figures[f"dora_vs_qdora_batch{batch}_{ratio}"]


@pytest.mark.slow
def test_quality_quick_scores_every_method(tmp_path):
    figures = last_json_line([BENCHMARKS / "quality.py", "--quick"], tmp_path)
    for name in ["base", "milora", "edora", "lorasb", "loraxs", "pissa", "qlora"]:
        assert 0 <= figures[f"arc_easy_{name}_acc"] <= 1, name
        low, high = figures[f"arc_easy_{name}_dev_nll_ci95"]
        assert 0 < low <= figures[f"arc_easy_{name}_dev_nll"] <= high, name
    assert {"arc_easy_milora_dretention", "arc_easy_verdict_milora_forgets_less"} <= set(figures)
    report = (tmp_path / "quality.md").read_text()
    assert "Learning rates" in report and "| claim | verdict |" in report and (tmp_path / "quality.png").is_file()


@pytest.mark.slow
def test_export_memory_quick_merges_like_peft_in_less_memory(tmp_path):
    figures = last_json_line([BENCHMARKS / "export_memory.py", "--quick"], tmp_path)
    assert figures["max_weight_gap"] < 1e-2  # the same merged weights as PEFT's, up to bf16 rounding
    assert 0 < figures["small_shards_mem_ratio"] <= figures["mem_ratio"] and figures["time_ratio"] > 0
    assert 0 < figures["gguf_mem_ratio"] < 1  # one tensor at a time, against PEFT's whole model


@pytest.mark.slow
def test_export_gguf_measures_memory_and_fidelity_beside_peft(tmp_path):
    figures = last_json_line([BENCHMARKS / "export_gguf.py"], tmp_path)
    assert figures["f16_kl"] < 1e-4 and figures["f16_top1"] > 0.99  # f16 rounding only
    assert figures["q8_0_kl"] < 1e-2 and figures["q8_0_top1"] > 0.9
    assert 0 < figures["f16_mem_ratio"] < 1 and 0 < figures["q8_0_mem_ratio"] < 1


@pytest.mark.slow
def test_export_fidelity_quick_compares_every_export(tmp_path):
    figures = last_json_line([BENCHMARKS / "export_fidelity.py", "--quick"], tmp_path)
    for method in ("edora", "milora"):
        assert figures[f"{method}_dequantized_kl_ratio"] < 0.05 < figures[f"{method}_peft_kl_ratio"]


@pytest.fixture
def quality(monkeypatch):
    """benchmarks/quality.py as a module."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("quality")


def quality_run(lr, trainable, dev_nll, general_nll, accuracy, seed):
    """A run's figures as quality.py's child reports them: 40 dev rows of 10 answer tokens and 20
    general-text windows of 100 tokens, each row's NLL per token `dev_nll` (`general_nll`) ± noise."""
    import random

    rng = random.Random(seed)
    dev = [10 * (dev_nll + rng.uniform(-0.05, 0.05)) for _ in range(40)]
    general = [100 * (general_nll + rng.uniform(-0.005, 0.005)) for _ in range(20)]
    mean = sum(dev) / 400
    return dict(lr=lr, trainable=trainable, final_loss=dev_nll, train_s=60.0, correct=round(40 * accuracy),
                examples=40, accuracy=accuracy, acc_ci95=[accuracy - 0.1, accuracy + 0.1],
                curve=[{"step": 0, "nll": 3.0, "ci95": [2.9, 3.1]}, {"step": 8, "nll": mean, "ci95": [mean - 0.03, mean + 0.03]}],
                dev_rows={"nll": dev, "tokens": [10] * 40}, general_rows={"nll": general, "tokens": [100] * 20})


def test_quality_report_writes_tables_plots_verdicts_and_summary(quality, tmp_path):
    base = quality_run(None, 0, 3.0, 2.0, 0.3, seed=0)
    base["curve"] = base["curve"][1:]
    results = {"arc_easy": {"base": base,
                            "qlora": quality_run(2e-4, 4_884_480, 1.0, 2.1, 0.5, seed=1),
                            "milora": quality_run(3e-4, 4_884_480, 0.98, 2.05, 0.55, seed=2),  # learns as well, forgets less
                            "edora": quality_run(2e-3, 209_280, 1.5, 2.0, 0.4, seed=3),  # learns 25% less: fails
                            "lorasb": quality_run(4e-3, 53_760, 1.1, 2.0, 0.45, seed=4)}}  # 5% less: within 10%
    grids = {"arc_easy": {"qlora": {1e-4: 1.2, 2e-4: 1.1, 4e-4: 1.3}, "milora": {1.5e-4: 1.3, 3e-4: 1.1, 6e-4: 1.2},
                          "edora": {1e-3: 1.6, 2e-3: 1.5, 4e-3: 1.7}, "lorasb": {1e-3: 1.3, 2e-3: 1.2, 4e-3: 1.1}}}
    summary = quality.write_report(results, grids, quality.BUDGETS["full"], tmp_path)
    for name, figures in results["arc_easy"].items():
        assert summary[f"arc_easy_{name}_dev_nll"] == pytest.approx(sum(figures["dev_rows"]["nll"]) / 400, abs=1e-4)
        assert summary[f"arc_easy_{name}_acc"] == figures["accuracy"]
        assert len(summary[f"arc_easy_{name}_dev_nll_ci95"]) == 2
    assert summary["arc_easy_qlora_dretention"] == pytest.approx(0.1, abs=2e-3)
    assert summary["arc_easy_milora_dretention"] == pytest.approx(0.05, abs=2e-3)
    assert summary["arc_easy_signal"] == pytest.approx(2.0 / 0.03, rel=0.02)
    assert {key: summary[f"arc_easy_verdict_{key}"] for key in ("milora_learns", "milora_forgets_less",
                                                                 "edora_matches", "lorasb_matches")} == {
        "milora_learns": "holds", "milora_forgets_less": "holds", "edora_matches": "fails", "lorasb_matches": "holds"}
    report = (tmp_path / "quality.md").read_text()
    assert "| PEFT QLoRA | 0.0001: 1.2000, **0.0002: 1.1000**, 0.0004: 1.3000 |" in report
    assert "| lorasb | 0.001: 1.3000, 0.002: 1.2000, **0.004: 1.1000** |" in report
    assert "| MiLoRA forgets less than LoRA | **holds** | -0.04" in report
    assert "| EDoRA matches LoRA with 20-90x fewer trainable parameters | **fails** | +0.5" in report
    assert "23.3× |" in report  # QLoRA's trainable parameters over EDoRA's
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "quality.json").read_text())["results"] == results


def test_quality_verdict_is_cannot_tell_inside_the_noise(quality):
    runs = {"base": quality_run(None, 0, 3.0, 2.0, 0.3, seed=0), "qlora": quality_run(2e-4, 10, 1.0, 2.1, 0.5, seed=1),
            "milora": quality_run(3e-4, 10, 1.0, 2.1, 0.5, seed=2)}
    for run in runs.values():  # noise far above the differences
        run["dev_rows"]["nll"] = [nll * (0.5 + i % 2) for i, nll in enumerate(run["dev_rows"]["nll"])]
        run["general_rows"]["nll"] = [nll * (0.5 + (i + 1) % 2) for i, nll in enumerate(run["general_rows"]["nll"])]
    runs["milora"]["dev_rows"]["nll"] = runs["milora"]["dev_rows"]["nll"][::-1]
    runs["milora"]["general_rows"]["nll"] = runs["milora"]["general_rows"]["nll"][::-1]
    assert {row["id"]: row["verdict"] for row in quality.verdicts(runs)} == {
        "milora_learns": "cannot tell", "milora_forgets_less": "cannot tell"}


def test_quality_claims_cannot_be_told_when_qlora_learned_nothing(quality):
    runs = {"base": quality_run(None, 0, 3.0, 2.0, 0.3, seed=0), "qlora": quality_run(2e-4, 10, 2.99, 2.1, 0.5, seed=1),
            "milora": quality_run(3e-4, 10, 1.0, 1.9, 0.5, seed=2)}  # clearly better on both, but against nothing
    assert quality.signal(runs) < quality.MIN_SIGNAL
    assert {row["verdict"] for row in quality.verdicts(runs)} == {"cannot tell"}


@pytest.mark.parametrize("best, tried", [(2e-4, [1e-4, 2e-4, 4e-4]),  # inside the grid: no more runs
                                         (1.6e-3, [1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]),  # doubled twice
                                         (1e-2, [1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]),  # and no further
                                         (5e-5, [2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4])])  # halved past the best
def test_quality_rate_grid_extends_while_its_best_is_at_an_edge(quality, best, tried, monkeypatch):
    measured = []

    def measure(name, lr, *args):
        measured.append(lr)
        return {"curve": [{"nll": (math.log(lr) - math.log(best)) ** 2}]}

    monkeypatch.setattr(quality, "measure", measure)
    chosen, scores = quality.best_rate("qlora", "arc_easy", SimpleNamespace(budget=quality.BUDGETS["full"]), {}, None)
    assert sorted(measured) == pytest.approx(tried) and list(scores) == pytest.approx(tried)
    assert chosen == pytest.approx(min(tried, key=lambda lr: abs(math.log(lr / best))))


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part(tmp_path):
    """The GPU check's code on tiny shapes: every method's loss falls, the merged export gives the
    trained logits, edora and PEFT's QLoRA are both measured, the 7B part reports its peaks beside
    the plan, and (on a CPU) two gloo processes train."""
    if not (SHARED_DATA / "gsm8k" / "train.jsonl").is_file():
        pytest.skip(f"needs GSM8K from the project's shared data: {SHARED_DATA}")
    figures = last_json_line([BENCHMARKS / "gpu_check.py", "--smoke"], tmp_path)
    assert figures["smoke"] and figures["ok"], figures
    assert all(figures["methods"][method]["ok"] for method in ("lora", "dora", "pissa", "milora", "loraxs", "edora",
                                                                "lorasb"))
    assert figures["export"]["logit_gap"] < 1e-4 and figures["export"]["top1_agreement"] == 1.0
    assert figures["peer"]["time_ratio"] > 0 and figures["peer"]["mem_ratio"] > 0
    seven_b = figures["seven_b"]
    assert seven_b["train_peak_mb"] > 0 and seven_b["plan_training_mb"] > 0 and "met" in seven_b
    assert figures["ddp"]["processes"] == 2 and figures["ddp"]["ok"]


@pytest.mark.slow
def test_preference_compares_dpo_with_trl_and_scores_dev_before_and_after(tmp_path):
    figures = last_json_line([BENCHMARKS / "preference.py", "--pairs", "8", "--dev", "8", "--peer-steps", "2",
                              "--memory-steps", "2"], tmp_path)
    assert figures["dev_pairs"] == 8 and figures["lora_vs_trl_step_time"] > 0 and figures["lora_vs_trl_peak_memory"] > 0
    for method in ("lora", "milora", "edora", "lorasb"):
        low, high = figures[f"{method}_ci95"]
        assert 0 <= low <= figures[f"{method}_accuracy"] <= high <= 1, method
