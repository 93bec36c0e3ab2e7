"""The run directory `qsvd finetune` writes, and reading one back, checked.

A run directory holds
- adapter.safetensors: every adapter tensor (trainable and frozen, without the frozen base);
- qsvd_config.json: the resolved config, the layer spec, the targets, the model fingerprint,
  the compute dtype and the adapter file's sha256: all that `load_run` and `qsvd export` need
  to rebuild or convert the model without any SVD;
- reference_adapter.safetensors: with --objective dpo, the trainable tensors at the start, DPO's
  reference (`objectives`), for `qsvd eval --task pref`;
- train_log.jsonl: Trainer's log, one entry a line (with a preference objective, its rewards);
- loss.png: the training loss against the step (and the --eval-steps held-out losses, the --eval-data
  scores, a preference objective's rewards);
- logs/: with --report-to tensorboard, its event files.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import QSVDError
from .files import file_sha256, seal_problem
from .load import ModelFiles, empty_model, load_tokenizer, resolve_model
from .methods import METHODS, AdapterSpec
from .split import adapter_state, layer_state, quantized_model, restore
from .version import __version__
from .weights import open_weights

ADAPTER_FILE = "adapter.safetensors"
REFERENCE_ADAPTER_FILE = "reference_adapter.safetensors"
REFERENCE_FILE = "reference.safetensors"  # in the work dir: DPO's π_ref of each training pair, and the reference adapter
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins")  # plotted, with rewards/accuracies
CONFIG_FILE = "qsvd_config.json"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
LOGS = "logs"  # --report-to tensorboard's event files
RECORD_KEYS = ("spec", "targets", "config", "model_fingerprint", "trainable_params", "final_loss")


def write_run(stage: Path, model: nn.Module, record: dict, log_history: list[dict],
              reference_adapter: dict[str, torch.Tensor] | None = None) -> None:
    """Write the run files into `stage`, the run's temporary directory (`files.publish`); the record
    seals the adapter, and DPO's reference adapter, with their sha256."""
    save_file(adapter_state(model), stage / ADAPTER_FILE, metadata={"format": "pt"})
    compute_dtype = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    if reference_adapter is not None:
        save_file(reference_adapter, stage / REFERENCE_ADAPTER_FILE, metadata={"format": "pt"})
        record = record | {"reference_adapter_sha256": file_sha256(stage / REFERENCE_ADAPTER_FILE)}
    record = {"qsvd_version": __version__, "spec": asdict(model.qsvd_spec), "targets": model.qsvd_targets,
              "compute_dtype": compute_dtype, "adapter_sha256": file_sha256(stage / ADAPTER_FILE), **record}
    (stage / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (stage / LOG_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in log_history))
    plot_losses(stage / PLOT_FILE, log_history, record.get("eval", {}))


def plot_losses(path: Path, log_history: list[dict], evals: dict[str, dict]) -> None:
    """The training loss against the step, each --eval-steps held-out loss, and each --eval-data
    score at the last step; under it, a preference objective's rewards."""
    from matplotlib.figure import Figure  # no pyplot: no display or global state needed

    steps = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    rewards = any(REWARDS[0] in entry for entry in log_history)
    figure = Figure(figsize=(7, 7 if rewards else 4), layout="constrained")
    axes, *reward_axes = figure.subplots(2 if rewards else 1, squeeze=False)[:, 0]
    if steps:
        axes.plot(*zip(*steps), label="training loss")
    for metric in dict.fromkeys(key for entry in log_history for key in entry if held_out_loss(key)):
        axes.plot(*zip(*[(entry["step"], entry[metric]) for entry in log_history if metric in entry]), "o-",
                  label=f"held-out loss: {metric.removeprefix('eval_').removesuffix('_loss')}")
    axes.set(xlabel="step", ylabel="loss", title="training loss")
    if evals:
        scores = axes.twinx()
        last = steps[-1][0] if steps else 0
        for name, result in evals.items():
            metric = {"ppl": "perplexity", "nll": "nll"}.get(result["task"], "accuracy")
            scores.plot([last], [result[metric]], "o", label=f"{name}: {metric} {result[metric]:.4g}")
        scores.set_ylabel("eval score")
        scores.legend(loc="upper right")
    axes.legend(loc="upper left")
    for rewards_axes in reward_axes:
        plot_rewards(rewards_axes, log_history)
    figure.savefig(path, dpi=100)


def plot_rewards(axes, log_history: list[dict]) -> None:
    """A preference objective's logged rewards and reward accuracy against the step."""
    for key in REWARDS:
        axes.plot(*zip(*[(entry["step"], entry[key]) for entry in log_history if key in entry]), label=key)
    accuracy = axes.twinx()
    accuracy.plot(*zip(*[(entry["step"], entry["rewards/accuracies"]) for entry in log_history
                         if "rewards/accuracies" in entry]), "k:", label="rewards/accuracies")
    axes.set(xlabel="step", ylabel="reward", title="rewards")
    accuracy.set(ylabel="accuracy", ylim=(-0.05, 1.05))
    axes.legend(loc="upper left")
    accuracy.legend(loc="upper right")


def held_out_loss(key: str) -> bool:
    """Whether a log entry's key is an --eval-steps held-out loss (Trainer's eval_NAME_loss)."""
    return key.startswith("eval_") and key.endswith("_loss")


def is_run(path: Path) -> bool:
    """Whether `path` is a qsvd run directory (complete or not)."""
    return path.is_dir() and (path / CONFIG_FILE).is_file()


@dataclass
class Run:
    """A run directory, read and checked: its record, layer spec, targets and adapter tensors."""

    path: Path
    record: dict
    spec: AdapterSpec
    targets: list[str]
    model: str  # as given to --model
    fingerprint: str
    tensors: dict[str, torch.Tensor]
    log: list[dict]  # Trainer's log entries
    reference_adapter: dict[str, torch.Tensor] | None = None  # --objective dpo: the trainable tensors at the start

    def layer_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """One target's adapter tensors, by their names in the layer (lora_A, core, magnitude, …)."""
        return layer_state(self.tensors, name)

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.record.get("compute_dtype", "float32"))

    @property
    def trust_remote_code(self) -> bool:
        return self.record["config"].get("trust_remote_code", False)

    def model_files(self) -> ModelFiles:
        """The base model's files, checked to be the ones this run was trained on."""
        files = resolve_model(self.model, self.record["config"].get("revision"))
        if files.fingerprint != self.fingerprint:
            raise QSVDError(f"the model {self.model} is not the one {self.path} was trained on "
                            f"(fingerprint {files.fingerprint} ≠ {self.fingerprint})")
        return files


def read_log(path: Path) -> list[dict]:
    """Trainer's log entries (none if the file is missing)."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    except ValueError:
        raise QSVDError(f"{path} is corrupt (not one JSON object a line)") from None


def read_record(path: Path) -> dict:
    """The run record, checked to hold what a finished run's record holds."""
    def corrupt(why: str) -> QSVDError:
        return QSVDError(f"{path} is corrupt ({why}); the run cannot be used, train it again")

    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise corrupt(f"not JSON: {error}") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise corrupt("not a run record")
    missing = [key for key in RECORD_KEYS if key not in record]
    if "model" not in record["config"]:
        missing.append("config.model")
    if missing:
        raise corrupt(f"it has no {missing[0]}")
    try:
        spec = AdapterSpec(**record["spec"])
    except TypeError as error:
        raise corrupt(f"its layer spec: {error}") from None
    if spec.method not in METHODS:
        raise corrupt(f"unknown method {spec.method!r}")
    return record


def sealed_tensors(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """A run's safetensors file, checked against the sha256 its record holds (a run from before
    checksums were recorded has none)."""
    if sha256 is not None and seal_problem(path.parent, {path.name: sha256}) is not None:
        raise QSVDError(f"{path} does not match the checksum in {CONFIG_FILE}: the file is corrupt, changed or "
                        f"missing; the run cannot be used, train it again")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise QSVDError(f"{path} is not a readable safetensors file ({error})") from None


def read_run(run_dir: str | Path) -> Run:
    """Open a run directory, or say clearly why it is not a complete, intact qsvd run."""
    run_dir = Path(run_dir)
    config_path, adapter_path = run_dir / CONFIG_FILE, run_dir / ADAPTER_FILE
    missing = [path.name for path in (config_path, adapter_path) if not path.is_file()]
    if not run_dir.is_dir() or missing:
        what = "no such directory" if not run_dir.is_dir() else f"no {' and no '.join(missing)}"
        raise QSVDError(f"{run_dir} is not a complete qsvd run ({what}); point at the --output "
                        f"directory of a finished `qsvd finetune`")
    record = read_record(config_path)
    reference = record.get("reference_adapter_sha256")
    run = Run(run_dir, record, AdapterSpec(**record["spec"]), list(record["targets"]), record["config"]["model"],
              record["model_fingerprint"], sealed_tensors(run_dir / ADAPTER_FILE, record.get("adapter_sha256")),
              read_log(run_dir / LOG_FILE),
              sealed_tensors(run_dir / REFERENCE_ADAPTER_FILE, reference) if reference else None)
    empty = [name for name in run.targets if not run.layer_tensors(name)]
    if empty:
        raise QSVDError(f"{adapter_path} has no tensors for layer {empty[0]} ({len(empty)} layers "
                        f"without any): the run is incomplete")
    return run


def load_run(run_dir: "str | Path | Run", device=None):
    """(model, tokenizer) rebuilt from a run directory (or one read): the base model plus the trained adapter."""
    run = run_dir if isinstance(run_dir, Run) else read_run(run_dir)
    files = run.model_files()
    model = empty_model(files, run.trust_remote_code)
    model = restore(model, run.spec, run.targets, run.tensors, device=device,
                    weights=open_weights(files, model), progress=False)
    return model, load_tokenizer(files, run.trust_remote_code)


def load_run_or_model(target: Path, bits: int | None, revision: str | None, progress: bool = True):
    """(model, tokenizer, run): a run directory as it trained (run is its Run), or a plain model (alias,
    hub id, HF directory or GGUF) stored at `bits`, default 16 (run is None)."""
    if is_run(target):
        if bits is not None:
            raise QSVDError(f"{target} is a trained run: its frozen base keeps the bits it was trained with; drop --bits")
        if revision is not None:
            raise QSVDError(f"{target} is a trained run: it keeps the base model it was trained on; drop --revision")
        run = read_run(target)
        return (*load_run(run), run)
    files = resolve_model(str(target), revision)
    tokenizer = load_tokenizer(files)  # checked before any weight is read
    return quantized_model(files, bits or 16, progress=progress), tokenizer, None
