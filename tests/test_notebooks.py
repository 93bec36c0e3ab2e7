"""The example notebooks run, cell by cell, on the embedded default model on this CPU."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

EXAMPLES = Path(__file__).parent.parent / "examples"
# Each notebook's first code cell, pointed at the embedded default and made small.
PARAMETERS = {
    "colab_quickstart": 'MODEL = "smollm2-135m"\nMETHOD = "edora"\nMAX_STEPS = 2\nBATCH_SIZE = 2\nSEQ_LEN = 128\n'
                        'EVAL_ROWS = 4\nMAX_NEW_TOKENS = 24\nOUTPUT = "runs/quickstart"\nQSVD_SOURCE = None',
    "compare_methods": 'MODEL = "smollm2-135m"\nMETHODS = ["lora", "edora"]\nMAX_STEPS = 2\nBATCH_SIZE = 2\n'
                       'SEQ_LEN = 128\nEVAL_ROWS = 4\nMAX_NEW_TOKENS = 24\nQSVD_SOURCE = None',
    "kaggle_t4": 'MODEL = "smollm2-135m"\nMETHOD = "edora"\nNUM_PROCESSES = 2\nMAX_STEPS = 2\nBATCH_SIZE = 1\n'
                 'SEQ_LEN = 128\nEVAL_ROWS = 4\nMAX_NEW_TOKENS = 24\nOUTPUT = "runs/kaggle"\nQSVD_SOURCE = None',
}


def run_notebook(name: str, workdir: Path) -> str:
    """Execute the notebook with its first code cell replaced; returns all its text output."""
    notebook = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert first.source.startswith("MODEL = ")  # the notebook's parameters, as its markdown says
    first.source = PARAMETERS[name]
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return "\n".join(output.get("text", "") + output.get("data", {}).get("text/plain", "")  # streams, rich's displays
                     for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def test_colab_quickstart_plans_trains_evaluates_and_exports(tmp_path):
    text = run_notebook("colab_quickstart", tmp_path)
    assert "fits: yes" in text and "trainable params: 209,280" in text
    assert "on 4 held-out problems" in text
    assert "['README.md', 'adapter_config.json', 'adapter_model.safetensors']" in text
    assert "quickstart-q8_0.gguf: 138 MB" in text and "FROM ./quickstart-q8_0.gguf" in text
    assert (tmp_path / "runs" / "quickstart" / "adapter.safetensors").is_file()


def test_compare_methods_trains_each_and_plots(tmp_path):
    text = run_notebook("compare_methods", tmp_path)
    assert "lora: 4,884,480 trainable" in text and "edora: 209,280 trainable" in text
    assert "plotted lora, edora" in text
    assert (tmp_path / "compare_methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kaggle_t4_trains_on_two_processes_evaluates_and_exports(tmp_path):
    text = run_notebook("kaggle_t4", tmp_path)
    assert "fits: yes" in text and "2 process(es), global batch 2" in text
    assert "trained on 2 processes: 209,280 trainable params" in text
    assert "on 4 held-out problems" in text
    assert "['README.md', 'adapter_config.json', 'adapter_model.safetensors']" in text
    assert (tmp_path / "runs" / "kaggle-peft" / "adapter_model.safetensors").is_file()
