"""`qsvd plan`: its parts equal what a prepared model really holds; it needs no weights; it advises."""

import shutil

import pytest
from click.testing import CliRunner

from qsvd.cli import cli
from qsvd.plan import Setup, budget
from qsvd.split import adapter_layers, prepare

from conftest import tiny_model


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "milora", "loraxs", "edora"])
def test_parts_equal_a_prepared_model(method, tiny_model_dir):
    model = prepare(tiny_model(), method, bits=4, rank=4, device="cpu", progress=False)
    layers = adapter_layers(model).values()
    adapter = sum(t.numel() * t.element_size() for layer in layers
                  for name, t in [*layer.named_parameters(), *layer.named_buffers()] if not name.startswith("base."))
    frozen = sum(layer.base.weight.numel() * layer.base.weight.element_size()
                 + layer.base.weight.quant_state.absmax.numel() + 4 * layer.base.weight.quant_state.state2.absmax.numel()
                 for layer in layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = budget(Setup(model=str(tiny_model_dir), method=method, bits=4, rank=4))
    assert parts["adapter"] == adapter and parts["gradients"] == 4 * trainable
    assert abs(parts["frozen targets"] - frozen) / frozen < 0.01


def test_plan_needs_only_config_json(tiny_model_dir, tmp_path):
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copy(tiny_model_dir / "config.json", only_config)
    result = CliRunner().invoke(cli, ["plan", "--model", str(only_config), "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert "frozen targets" in result.output and "fits: yes" in result.output


def test_plan_for_a_t4_advises_what_fits():
    result = CliRunner().invoke(cli, ["plan", "--model", "llama3-8b", "--gpu", "t4", "--batch-size", "8",
                                      "--seq-len", "2048"])
    assert result.exit_code == 0, result.output
    assert "compute fp16" in result.output and "fits: no" in result.output
    assert result.output.strip().splitlines()[-1].endswith("- fits")
    a100 = CliRunner().invoke(cli, ["plan", "--model", "llama3-8b", "--gpu", "a100-40"])
    assert "compute bf16" in a100.output and "fits: yes" in a100.output


@pytest.mark.parametrize("args, message", [(["--gpu", "v100"], "Invalid value for '--gpu'"),
                                           (["--rank", "0"], "--rank must be positive"),
                                           (["--bits", "3"], "--bits 3 is not supported"),
                                           (["--model", "nowhere-7b"], "no such file or directory, and not an alias")])
def test_plan_bad_input(args, message):
    result = CliRunner().invoke(cli, ["plan", *args])
    assert result.exit_code == 2 and message in result.output, result.output
