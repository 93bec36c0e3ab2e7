"""Training objectives (`--objective`): sft, the supervised loss (`loss.supervised_loss`), or a
preference objective over chosen/rejected pairs (`data.pair_conversations`), below.

With π(y) = Σ_t log p(y_t | x, y_<t) over a response's tokens, and π̄(y) = π(y) / |y| per token:
- dpo (arXiv 2305.18290): L = −log σ(β[(π(y_c) − π_ref(y_c)) − (π(y_r) − π_ref(y_r))]), π_ref the
  model at the start of training; reward r(y) = β(π(y) − π_ref(y)).
- orpo (arXiv 2403.07691): L = NLL(y_c) − λ log σ(log odds(y_c) − log odds(y_r)), odds(y) =
  e^π̄ / (1 − e^π̄) and NLL(y_c) the chosen responses' mean per-token loss; reward r(y) = β π̄(y).
- a plain model, or an sft run, in `qsvd eval --task pref`: r(y) = π̄(y).
Each returns the loss, the mean over the batch's pairs (TRL's), and the per-pair metrics TRL logs:
rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected.

DPO's reference costs no memory: π_ref of every training pair is computed once, before the first
step, by the model as it starts (`reference_log_likelihoods`), two numbers a pair; `qsvd eval`
swaps the run's starting adapter tensors in for the reference (`adapter_swapped`). Neither is
the adapter-disabled model, which for pissa, milora and lorasb is not the starting model.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import datasets
import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from .console import console
from .loss import row_log_likelihoods

OBJECTIVES = ("sft", "dpo", "orpo")
DPO_BETA = 0.1  # DPO's β (the paper's and TRL's)
ORPO_LAMBDA = 0.1  # ORPO's λ, the odds-ratio term's weight (the paper's; TRL's `beta`)


def pair_log_likelihoods(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """π and |y| of each of a pair batch's 2B rows [chosen…, rejected…], in float32."""
    sums, counts = row_log_likelihoods(model, {key: value for key, value in batch.items() if key != "reference"})
    return sums.float(), counts


def halves(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and the rejected half of a [chosen…, rejected…] tensor."""
    return values.chunk(2)


def pair_metrics(rewards: torch.Tensor, logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics TRL logs, one value a pair, from each row's reward and log-likelihood (π for
    DPO, π̄ for ORPO, as TRL's trainers log them)."""
    chosen, rejected = halves(rewards.detach())
    logps_chosen, logps_rejected = halves(logps.detach())
    return {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "rewards/accuracies": (chosen > rejected).float(), "logps/chosen": logps_chosen,
            "logps/rejected": logps_rejected}


class DPO:
    name = "dpo"
    needs_reference = True
    # A gradient init's step η (LoRA-SB's): full fine-tuning's DPO learning rate, TRL's default. The
    # start is DPO's reference, the model being aligned, which a step at the adapter's lr would move.
    init_lr = 1e-6

    def __init__(self, beta: float):
        self.beta = beta

    def rewards(self, sums: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return self.beta * (sums - reference)

    def loss(self, sums: torch.Tensor, counts: torch.Tensor,
             reference: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rewards = self.rewards(sums, counts, reference.to(sums.dtype))
        chosen, rejected = halves(rewards)
        return -F.logsigmoid(chosen - rejected).mean(), pair_metrics(rewards, sums)


class ORPO:
    name = "orpo"
    needs_reference = False
    init_lr = None  # a gradient init's step η: SFT's rule (ORPO trains the chosen response's NLL too)

    def __init__(self, beta: float, weight: float):
        self.beta, self.weight = beta, weight

    def rewards(self, sums: torch.Tensor, counts: torch.Tensor, reference=None) -> torch.Tensor:
        return self.beta * sums / counts.clamp_min(1)

    def loss(self, sums: torch.Tensor, counts: torch.Tensor, reference=None) -> tuple[torch.Tensor, dict]:
        mean = sums / counts.clamp_min(1)
        chosen, rejected = halves(mean)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        chosen_sums, _ = halves(sums)
        chosen_counts, _ = halves(counts)
        nll = -chosen_sums.sum() / chosen_counts.sum().clamp_min(1)
        metrics = pair_metrics(self.rewards(sums, counts), mean) | {
            "nll_loss": nll.detach()[None], "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
        return nll - self.weight * ratio.mean(), metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, without cancellation: log(−expm1(x)) near 0, log1p(−eˣ) below −ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-x.exp()), torch.log(-torch.expm1(x)))


class PerToken:
    """A plain model's preference, or an sft run's: the higher mean log-likelihood per token."""
    name = "per-token log-likelihood"
    needs_reference = False

    def rewards(self, sums: torch.Tensor, counts: torch.Tensor, reference=None) -> torch.Tensor:
        return sums / counts.clamp_min(1)


def preference_objective(objective: str, beta: float | None = None, orpo_lambda: float | None = None):
    """The objective's pair loss and rewards (`PerToken` for sft), with β and λ by default the papers'."""
    beta, orpo_lambda = beta or DPO_BETA, orpo_lambda or ORPO_LAMBDA
    return {"dpo": lambda: DPO(beta), "orpo": lambda: ORPO(beta, orpo_lambda)}.get(objective, PerToken)()


def run_objective(settings: dict):
    """The objective of a run, from its recorded config (sft for a run from before objectives)."""
    return preference_objective(settings.get("objective", "sft"), settings.get("beta"), settings.get("orpo_lambda"))


def batch_loss(objective, model: nn.Module, batch: dict[str, torch.Tensor],
               at_start: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss on a pair batch and its metrics; against the batch's `reference`, or
    `at_start` against the model itself (π_ref = π, detached): the loss whose gradient LoRA-SB's
    init estimates, −(β/2)(∇π(y_c) − ∇π(y_r)) a pair for DPO."""
    sums, counts = pair_log_likelihoods(model, batch)
    reference = sums.detach() if at_start else batch.get("reference")
    if objective.needs_reference and reference is None:
        raise ValueError(f"{objective.name} needs the reference log-likelihoods in the batch")
    return objective.loss(sums, counts, reference)


def start_loss(objective, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss at the start of training (`batch_loss` `at_start`), whose gradient LoRA-SB estimates."""
    return batch_loss(objective, model, batch, at_start=True)[0]


@torch.no_grad()
def pairs_log_likelihoods(model: nn.Module, pairs: datasets.Dataset, collate, batches: list[list[int]],
                          description: str,
                          autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """π and |y| of every pair's two responses as [pairs, 2] (chosen, rejected), float64 and
    integer, batch by batch (`batches`: lists of pair indices, made into batches by `collate`),
    under autocast in `autocast_dtype` (None: none)."""
    device = model.device
    sums, counts = torch.zeros(len(pairs), 2, dtype=torch.float64), torch.zeros(len(pairs), 2, dtype=torch.long)
    for batch in track(batches, description=description, console=console):
        inputs = collate([pairs[i] for i in batch])
        with torch.autocast(device.type, autocast_dtype) if autocast_dtype else nullcontext():
            batch_sums, batch_counts = pair_log_likelihoods(model, {key: value.to(device)
                                                                    for key, value in inputs.items()})
        sums[batch] = torch.stack(halves(batch_sums.double().cpu()), dim=1)
        counts[batch] = torch.stack(halves(batch_counts.cpu()), dim=1)
    return sums, counts


def reference_log_likelihoods(model: nn.Module, pairs: datasets.Dataset, collate, batch_size: int,
                              autocast_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """π_ref(y_c) and π_ref(y_r) of every pair, in float64, by the model as it is now (dropout off),
    under autocast in `autocast_dtype` as training computes (None: none)."""
    was_training = model.training
    model.eval()
    batches = [list(range(start, min(start + batch_size, len(pairs)))) for start in range(0, len(pairs), batch_size)]
    try:
        sums, _ = pairs_log_likelihoods(model, pairs, collate, batches, "dpo reference log-likelihoods", autocast_dtype)
    finally:
        model.train(was_training)
    return {side: sums[:, column].contiguous() for column, side in enumerate(("chosen", "rejected"))}


def with_reference(pairs: datasets.Dataset, reference: dict[str, torch.Tensor]) -> datasets.Dataset:
    """The pairs with their reference log-likelihoods as columns, which `PairCollator` batches."""
    for side, values in reference.items():
        pairs = pairs.add_column(f"reference_{side}", values.tolist())
    return pairs


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter tensors by qualified name, copied: the reference adapter, at the start."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


@contextmanager
def adapter_swapped(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """The model with its trainable tensors set to `tensors` (the reference's) meanwhile."""
    trained = trainable_tensors(model)
    model.load_state_dict(tensors, strict=False)
    try:
        yield
    finally:
        model.load_state_dict(trained, strict=False)
