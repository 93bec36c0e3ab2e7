"""Training checkpoints that survive a kill: sealed with a manifest, published by one rename.

A run in progress keeps its resolved config and its checkpoints in a work dir beside --output
(`.<name>.partial`); the finished run replaces it.

Trainer writes each checkpoint (adapter tensors, optimizer, scheduler, RNG states, trainer state)
into a staging directory. `SealCheckpoints` then seals it (`files.write_manifest`: the sha256 of
every file) and renames it into `checkpoints/`. A checkpoint there whose manifest is missing or
does not match its files is never resumed from.
"""

import json
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback

from .config import FinetuneConfig
from .console import console
from .errors import QSVDError
from .files import check_output, move_into_place, publish, read_manifest, remove, seal_problem, write_manifest
from .run_dir import is_run

KEEP = 2  # sealed checkpoints kept: the newest and the one before it
CHECKPOINTS = "checkpoints"  # in the work dir
RUN_CONFIG = "config.json"  # in the work dir: the resolved config, which a resume must match
# Options a resume may change: they do not touch what was computed before the checkpoint. The run's
# length may grow past the checkpoint; Trainer then lays its schedule over the new length.
RESUME_MAY_CHANGE = ("resume", "overwrite", "eval_data", "eval_task", "eval_split", "report_to", "save_steps")
RESUME_MAY_GROW = ("max_steps", "epochs")


def seal(staged: Path, directory: Path) -> None:
    """Seal the checkpoint Trainer staged (`files.write_manifest`), and rename it into `directory`."""
    write_manifest(staged)
    directory.mkdir(parents=True, exist_ok=True)
    move_into_place(staged, directory / staged.name)


def is_intact(checkpoint: Path) -> bool:
    """Whether the checkpoint has a manifest and every file matches it."""
    manifest = read_manifest(checkpoint)
    return manifest is not None and seal_problem(checkpoint, manifest["sha256"]) is None


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def sealed_checkpoints(directory: Path) -> list[Path]:
    """The checkpoints in `directory`, oldest first (by step)."""
    found = [p for p in directory.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()]
    return sorted(found, key=step_of)


def newest_intact(directory: Path) -> Path | None:
    """The newest checkpoint whose files match its manifest."""
    return next((p for p in reversed(sealed_checkpoints(directory)) if is_intact(p)), None)


class SealCheckpoints(TrainerCallback):
    """After Trainer saves checkpoint-N into its output dir: seal it, move it into `directory`,
    and drop all but the newest `KEEP`; the main process does this once every process has
    written its part (each writes its own RNG state)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        if not state.is_world_process_zero:
            return
        seal(Path(args.output_dir) / f"checkpoint-{state.global_step}", self.directory)
        for old in sealed_checkpoints(self.directory)[:-KEEP]:
            remove(old)


def work_dir(output: Path) -> Path:
    """Where a run keeps its config and checkpoints until it finishes: beside --output, never in it."""
    return output.with_name(f".{output.name}.partial")


def resume_point(config: FinetuneConfig, output: Path) -> Path | None:
    """Check --output against --resume and --overwrite, before any heavy work; returns the
    checkpoint to continue from, if any."""
    work = work_dir(output)
    if not config.resume:
        if work.is_dir() and not config.overwrite:
            newest = newest_intact(work / CHECKPOINTS)
            where = f"newest checkpoint: step {step_of(newest)}" if newest else "no complete checkpoint yet"
            raise QSVDError(f"--output {output} has an interrupted run ({where}, in {work}); continue it "
                            f"with --resume, or start over with --overwrite")
        check_output(output, config.overwrite)
        return None
    if not (work / RUN_CONFIG).is_file():
        finished = " (the run there finished; --overwrite trains it again)" if is_run(output) else ""
        raise QSVDError(f"--resume: there is no interrupted run for --output {output}{finished}")
    try:
        saved, current = json.loads((work / RUN_CONFIG).read_text()), config.resolved()
    except ValueError:
        raise QSVDError(f"--resume: {work / RUN_CONFIG} is corrupt; start over with --overwrite") from None
    saved = FinetuneConfig().to_dict() | saved  # an option added since the run started has its default
    changed = [key for key in current if key not in RESUME_MAY_CHANGE + RESUME_MAY_GROW and saved.get(key) != current[key]]
    if changed:
        differences = ", ".join(f"{key} {saved.get(key)!r} (now {current[key]!r})" for key in changed)
        raise QSVDError(f"--resume: the interrupted run used other options: {differences}; resume with "
                        f"the same options (--max-steps and --epochs may grow; --save-steps, --report-to and "
                        f"--eval-data may change), or start over with --overwrite")
    check_output(output, config.overwrite or saved["overwrite"])
    checkpoint = newest_intact(work / CHECKPOINTS)
    if checkpoint is not None:
        check_length_grows(saved, current, checkpoint)
    console.print(f"resuming from step {step_of(checkpoint)}" if checkpoint else
                  "no complete checkpoint yet: training starts from step 0")
    return checkpoint


def check_length_grows(saved: dict, current: dict, checkpoint: Path) -> None:
    """A changed --max-steps or --epochs must reach past the checkpoint's step, or its epoch."""
    for key, flag, unit in (("max_steps", "--max-steps", "step"), ("epochs", "--epochs", "epoch")):
        if current[key] is None or current[key] == saved.get(key):
            continue
        done = (step_of(checkpoint) if unit == "step" else
                json.loads((checkpoint / "trainer_state.json").read_text())["epoch"])
        if current[key] <= done:
            raise QSVDError(f"--resume: {flag} {current[key]:g} does not reach past the checkpoint's {unit} {done:g}; "
                            f"give a larger {flag}, or start over with --overwrite")


def start_work_dir(config: FinetuneConfig, output: Path) -> Path:
    """The run's work dir, with its config recorded; a fresh run first clears an old one."""
    work = work_dir(output)
    if not config.resume:
        remove(work)  # an interrupted run that --overwrite replaces
    remove(work / "trainer")  # what a killed run was writing
    work.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config.resolved(), indent=2) + "\n"
    publish(work / RUN_CONFIG, lambda tmp: tmp.write_text(text), directory=False)
    return work
