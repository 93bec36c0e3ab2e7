"""The training loss: the causal-LM loss with vocabulary logits only where a token carries loss."""

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .data import IGNORE_INDEX


def supervised_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor],
                    num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The causal-LM loss, Σ CE(lm_head(h_t), y_{t+1}) / N, with vocabulary logits computed only
    at the positions whose next token carries loss (not at prompt or padding tokens).

    The logits are the largest tensors of a step (tokens × vocab); the model's own loss computes
    them everywhere. N is `num_items` (the accumulated batch's count, as Trainer passes it) or
    this batch's count of supervised tokens.
    """
    hidden = model.get_decoder()(input_ids=inputs["input_ids"],
                                 attention_mask=inputs.get("attention_mask")).last_hidden_state
    targets = inputs["labels"][:, 1:]
    supervised = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][supervised]).float()
    loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
    return loss / (num_items if num_items is not None else supervised.sum().clamp_min(1))


def plain_logits(model: PreTrainedModel) -> bool:
    """Whether the model's logits are lm_head(hidden) with nothing after (no soft-capping or scaling)."""
    config = model.config
    return (model.get_output_embeddings() is not None and
            not any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")))
