"""The releases qsvd is tested with: pyproject bounds each of torch's companions below and above,
the installed releases lie inside those bounds, and qsvd's own output carries no library
deprecation notice (it uses the current APIs)."""

import json
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement

COMPANIONS = ("transformers", "peft", "bitsandbytes", "accelerate", "datasets", "gguf")
PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def test_each_companion_has_a_tested_range_and_the_installed_release_is_in_it():
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    requirements = {requirement.name.lower(): requirement for requirement in map(Requirement, dependencies)}
    for name in COMPANIONS:
        specifier = requirements[name].specifier
        assert {spec.operator for spec in specifier} == {">=", "<"}, f"{name}: {specifier}"
        assert specifier.contains(version(name)), f"{name} {version(name)} is outside {specifier}"


def test_a_run_with_every_evaluation_prints_no_deprecation_notice(tiny_model_dir, tmp_path):
    """lorasb (its gradient estimate turns checkpointing on itself), then a choice evaluation (a
    shared-prefix cache) and a generation, in a fresh process as a user runs them."""
    choice, generation = tmp_path / "choice.jsonl", tmp_path / "gen.jsonl"
    choice.write_text(json.dumps({"instruction": "Which is a gas?\n\nAnswer1: ice Answer2: steam\n\nAnswer format: "
                                  "answer1/answer2", "input": "", "output": "the correct answer is answer2",
                                  "answer": "answer2"}) + "\n")
    generation.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    run = subprocess.run([sys.executable, "-m", "qsvd", "finetune", "--model", str(tiny_model_dir), "--method", "lorasb",
                          "--rank", "4", "--max-steps", "1", "--seq-len", "400", "--eval-data", str(choice),
                          "--eval-data", str(generation), "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())
    assert {result["task"] for result in record["eval"].values()} == {"choice", "gen"}
    assert "deprecat" not in (run.stdout + run.stderr).lower(), run.stderr[-3000:]
