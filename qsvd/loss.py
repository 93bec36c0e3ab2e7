"""The training loss and per-row log-likelihoods, with vocabulary logits only where a token carries loss."""

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .data import IGNORE_INDEX


def supervised_logits(model: PreTrainedModel, inputs: dict[str, torch.Tensor]):
    """(logits, targets, mask): the next-token logits at the positions t whose next token
    y_{t+1} carries loss, those tokens, and the [rows, length − 1] mask of the positions.

    The logits are the largest tensors of a step (tokens × vocab); the model's own loss computes
    them everywhere. Models whose logits are not lm_head(hidden) take the full forward.
    """
    targets = inputs["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    if plain_logits(model):
        hidden = model.get_decoder()(input_ids=inputs["input_ids"],
                                     attention_mask=inputs.get("attention_mask")).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][mask])
    else:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits[:, :-1][mask]
    return logits.float(), targets[mask], mask


def supervised_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor],
                    num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The causal-LM loss Σ CE(lm_head(h_t), y_{t+1}) / N over the supervised tokens.

    N is `num_items` (the accumulated batch's count, as Trainer passes it) or this batch's count
    of supervised tokens.
    """
    logits, targets, mask = supervised_logits(model, inputs)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss / (num_items if num_items is not None else mask.sum().clamp_min(1))


def row_log_likelihoods(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's Σ_t log p(y_{t+1} | y_≤t) over its supervised tokens, and their count."""
    logits, targets, mask = supervised_logits(model, inputs)
    token_log_probs = -F.cross_entropy(logits, targets, reduction="none")
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], device=logits.device).index_add_(0, rows, token_log_probs)
    return sums, mask.sum(dim=1)


def plain_logits(model: PreTrainedModel) -> bool:
    """Whether the model's logits are lm_head(hidden) with nothing after (no soft-capping or scaling)."""
    config = model.config
    return (model.get_output_embeddings() is not None and
            not any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")))
