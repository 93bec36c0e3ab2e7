"""The run configuration: defaults, a YAML file, then CLI flags, in that order of precedence."""

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .batching import BATCHINGS
from .errors import QSVDError
from .load import EMBEDDED_ALIAS
from .methods import INIT_SAMPLES, METHODS, AdapterSpec, make_spec
from .objectives import OBJECTIVES, preference_objective


LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}  # → package
TASK_TYPES = tuple(INIT_SAMPLES)


@dataclass
class FinetuneConfig:
    model: str = EMBEDDED_ALIAS
    revision: str | None = None  # a hub model's branch, tag or commit
    method: str = "edora"
    bits: int = 4
    rank: int = 16
    alpha: float | None = None  # default: the rank, so s = 1
    targets: list[str] | None = None  # default: every linear layer of the decoder blocks
    dropout: float = 0.0
    core_init: str = "normal"  # loraxs/edora: "normal" (σ = 1e-5) or "zeros"
    refine_iters: int = 0  # pissa: quantization-aware refinement iterations
    svd_niter: int | None = None  # top-r SVD: randomized with this many power iterations; default exact
    dtype: str = "auto"  # compute dtype: auto (fp32 on CPU, bf16 on GPUs of compute capability ≥ 8.0, else fp16), fp32, bf16, fp16
    task_type: str = "math"  # one of TASK_TYPES: sets the default --grad-samples
    grad_samples: int | None = None  # lorasb: rows for the gradient estimate (default: INIT_SAMPLES[task_type])
    grad_mem_budget: str | None = None  # lorasb: e.g. "2GB" of gradients at a time (default: half the free memory)
    grad_sketch: bool = False  # lorasb: one pass with a rank-(2r+1) sketch of each gradient instead
    objective: str = "sft"  # sft, or a preference objective over chosen/rejected pairs: dpo, orpo
    beta: float | None = None  # dpo's β; orpo's reward scale β (default 0.1, objectives.DPO_BETA)
    orpo_lambda: float | None = None  # orpo's λ, the weight of its odds-ratio term (default 0.1, objectives.ORPO_LAMBDA)
    init_lr: float | None = None  # lorasb: η of the init step −η·sign(G) (default: lr / full fine-tuning's warm-up steps; dpo: DPO.init_lr)
    data: str | None = None  # a file, a save_to_disk directory or a hub id; default: built-in arithmetic problems
    data_config: str | None = None  # a hub dataset's configuration
    data_split: str | None = None  # a hub dataset's (or saved DatasetDict's) split; default train
    prompt_field: str | None = None  # with response_field: the rows' own layout
    response_field: str | None = None
    max_rows: int | None = None  # train on the first rows only
    truncate: bool = False  # cut a long row's response to --seq-len instead of skipping the row
    eval_data: list[str] | None = None  # data to evaluate on after training
    eval_task: str | None = None  # gen, choice or ppl; default: chosen by each file's rows
    eval_split: str | None = None  # the split of a hub dataset (or saved DatasetDict) in eval_data; default test
    eval_steps: int | None = None  # also score each eval_data file's held-out loss every this many steps
    eval_rows: int = 200  # rows of each eval_data file that --eval-steps scores
    early_stopping: int | None = None  # stop after this many --eval-steps evaluations without a lower held-out loss
    keep_best: bool = False  # publish the adapter of the --eval-steps evaluation with the lowest held-out loss
    report_to: str | list[str] = "none"  # tensorboard, wandb, trackio, mlflow, comma-separated (Trainer's integrations)
    max_steps: int | None = None
    epochs: float | None = None  # default: 1 when max_steps is not set
    lr: float | None = None  # default: the method's own
    warmup_ratio: float = 0.03
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    batching: str = "auto"  # padded, grouped, padding-free or packed (see batching.py); auto: the device's fastest
    gradient_checkpointing: bool = True
    optim: str = "paged_adamw_8bit"
    logging_steps: int = 1
    save_steps: int | None = 50  # a checkpoint every this many steps (None: none)
    resume: bool = False  # continue an interrupted run in --output from its newest checkpoint
    output: str | None = None  # default: runs/<method>
    overwrite: bool = False
    seed: int = 42
    trust_remote_code: bool = False

    @classmethod
    def from_yaml(cls, path: str | Path) -> dict:
        """The YAML file's keys, checked against the known ones."""
        path = Path(path)
        if not path.is_file():
            raise QSVDError(f"--config {path}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise QSVDError(f"--config {path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise QSVDError(f"--config {path} must be a mapping of option: value")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QSVDError(f"--config {path} has unknown keys: {', '.join(unknown)}")
        return values

    @classmethod
    def resolve(cls, config_file: str | Path | None = None, **overrides) -> "FinetuneConfig":
        """Defaults ← YAML file ← overrides that are not None; then validated."""
        values = cls.from_yaml(config_file) if config_file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("targets"), str):
            values["targets"] = [t for t in values["targets"].split(",") if t]
        if isinstance(values.get("eval_data"), str):
            values["eval_data"] = [values["eval_data"]]
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        self.spec()  # checks method, bits, rank, alpha, dropout, core_init, refine_iters, svd_niter, dtype
        positive = {"lr": self.lr, "init-lr": self.init_lr, "batch-size": self.batch_size, "grad-accum": self.grad_accum,
                    "seq-len": self.seq_len, "max-steps": self.max_steps, "epochs": self.epochs,
                    "grad-samples": self.grad_samples, "save-steps": self.save_steps, "max-rows": self.max_rows,
                    "eval-steps": self.eval_steps, "eval-rows": self.eval_rows, "early-stopping": self.early_stopping}
        check_positive(positive)
        if self.eval_steps and not self.eval_data:
            raise QSVDError("--eval-steps scores the --eval-data files: give at least one")
        for flag, given in (("--early-stopping", self.early_stopping), ("--keep-best", self.keep_best)):
            if given and not self.eval_steps:
                raise QSVDError(f"{flag} follows the held-out loss that --eval-steps N scores: give --eval-steps")
        if self.max_steps is not None and self.epochs is not None:
            raise QSVDError("give --max-steps or --epochs, not both")
        self.loggers  # checks --report-to
        if (self.prompt_field is None) != (self.response_field is None):
            raise QSVDError("give --prompt-field and --response-field together")
        if self.task_type not in TASK_TYPES:
            raise QSVDError(f"--task-type must be one of {', '.join(TASK_TYPES)}, got {self.task_type!r}")
        self.grad_budget_bytes  # parses --grad-mem-budget
        if self.batching not in BATCHINGS:
            raise QSVDError(f"--batching must be one of {', '.join(BATCHINGS)}, got {self.batching!r}")
        self.check_objective()

    def check_objective(self) -> None:
        if self.objective not in OBJECTIVES:
            raise QSVDError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        check_positive({"beta": self.beta, "orpo-lambda": self.orpo_lambda})
        for flag, value, takes in (("--beta", self.beta, ("dpo", "orpo")), ("--orpo-lambda", self.orpo_lambda, ("orpo",))):
            if value is not None and self.objective not in takes:
                raise QSVDError(f"{flag} applies to --objective {' and '.join(takes)}, not {self.objective}")
        if self.objective == "sft":
            return
        if self.batching == "packed":
            raise QSVDError(f"--objective {self.objective} keeps each pair's two rows in one batch: --batching "
                            f"packed would pack rows across pairs; choose auto, padded, grouped or padding-free")
        if self.eval_steps:
            raise QSVDError(f"--eval-steps scores a supervised held-out loss; with --objective {self.objective}, "
                            f"score preference pairs after training: --eval-data PAIRS (or qsvd eval --task pref)")

    @property
    def pair_objective(self):
        """The preference objective's loss (`objectives.DPO`, `ORPO`), or None for sft."""
        if self.objective == "sft":
            return None
        return preference_objective(self.objective, self.beta, self.orpo_lambda)

    def spec(self) -> AdapterSpec:
        return make_spec(self.method, self.rank, self.alpha, self.bits, dropout=self.dropout,
                         core_init=self.core_init, refine_iters=self.refine_iters, svd_niter=self.svd_niter,
                         dtype=self.dtype)

    @property
    def loggers(self) -> list[str]:
        """--report-to as a list, each checked to be known and installed."""
        from transformers import integrations

        given = self.report_to if isinstance(self.report_to, list) else str(self.report_to).split(",")  # YAML: a list
        names = [str(name).strip() for name in given if str(name).strip() not in ("", "none")]
        for name in names:
            if name not in LOGGERS:
                raise QSVDError(f"--report-to {name!r} is not one of: none, {', '.join(LOGGERS)}")
            if not getattr(integrations, f"is_{name}_available")():
                raise QSVDError(f"--report-to {name} needs its package: pip install {LOGGERS[name]}")
        return names

    @property
    def gradient_samples(self) -> int:
        return self.grad_samples or INIT_SAMPLES[self.task_type]

    @property
    def grad_budget_bytes(self) -> int | None:
        return None if self.grad_mem_budget is None else parse_size(self.grad_mem_budget, "--grad-mem-budget")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else METHODS[self.method].default_lr

    @property
    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.method}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self) -> dict:
        """The config with every derived default filled in, as a run records it."""
        return self.to_dict() | {"alpha": self.spec().alpha, "lr": self.learning_rate,
                                 "grad_samples": self.gradient_samples, "output": str(self.output_dir)}


def check_positive(flags: dict[str, float | None]) -> None:
    """Every given value of `flags` (flag name → value) must be a finite number above zero."""
    for flag, value in flags.items():
        if value is not None and not 0 < value < math.inf:
            raise QSVDError(f"--{flag} must be positive and finite, got {value}")


def parse_size(text: str, flag: str) -> int:
    """'512MB', '4GB', '1.5GiB' → bytes (KB, MB, GB, TB and their KiB forms are all powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT])i?B\s*", str(text), re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise QSVDError(f"{flag} must be a positive size such as 512MB or 4GB, got {text!r}")
    return int(float(match[1]) * 1024 ** ("KMGT".index(match[2].upper()) + 1))
