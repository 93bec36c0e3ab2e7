"""Stage 5: write a run directory, and rebuild a trained model from one.

A run directory holds
- adapter.safetensors: every adapter tensor (trainable and frozen, without the frozen base);
- qsvd_config.json: the resolved config, the layer spec, the targets and the model fingerprint,
  which is all `load_run` needs to rebuild the model without any SVD;
- train_log.jsonl: Trainer's log, one entry a line.
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import QSVDError
from .load import empty_model, load_tokenizer, open_weights, resolve_model
from .methods import AdapterSpec
from .split import adapter_state, restore

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "qsvd_config.json"
LOG_FILE = "train_log.jsonl"


def write_run(stage: Path, model: nn.Module, record: dict, log_history: list[dict]) -> None:
    """Write the run files into the staging directory `stage`."""
    save_file(adapter_state(model), stage / ADAPTER_FILE, metadata={"format": "pt"})
    record = {"qsvd_version": __version__, "spec": asdict(model.qsvd_spec),
              "targets": model.qsvd_targets, **record}
    (stage / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (stage / LOG_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in log_history))


def publish(stage: Path, output: Path) -> None:
    """Move the finished staging directory to `output`, replacing an old run only now."""
    if output.exists():
        trash = output.with_name(f".{output.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(output, trash)
        shutil.rmtree(trash)
    os.replace(stage, output)


def is_run(path: Path) -> bool:
    """Whether `path` is a qsvd run directory (complete or not)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def load_run(run_dir: str | Path, device=None):
    """(model, tokenizer) rebuilt from a run directory: the base model plus the trained adapter."""
    run_dir = Path(run_dir)
    config_path, adapter_path = run_dir / CONFIG_FILE, run_dir / ADAPTER_FILE
    if not config_path.is_file() or not adapter_path.is_file():
        raise QSVDError(f"{run_dir} is not a complete qsvd run (needs {CONFIG_FILE} and {ADAPTER_FILE})")
    record = json.loads(config_path.read_text())
    trust_remote_code = record["config"]["trust_remote_code"]
    files = resolve_model(record["config"]["model"])
    if files.fingerprint != record["model_fingerprint"]:
        raise QSVDError(f"the model {record['config']['model']} is not the one {run_dir} was trained on "
                        f"(fingerprint {files.fingerprint} ≠ {record['model_fingerprint']})")
    model = empty_model(files, trust_remote_code)
    model = restore(model, AdapterSpec(**record["spec"]), record["targets"], load_file(adapter_path),
                    device=device, weights=open_weights(files, model), progress=False)
    return model, load_tokenizer(files, trust_remote_code)
