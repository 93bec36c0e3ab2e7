"""The training loss and per-row log-likelihoods, with vocabulary logits only where a token carries
loss, and only a chunk of them at a time.

The logits are the largest tensors of a step (tokens × vocabulary: 2048 × 128,256 in fp32 is 1 GiB,
and the cross-entropy keeps its log-softmax and, in backward, its gradient beside it). The model's
own loss computes them at every position. Here the decoder's hidden states h_t are taken at the
supervised positions only and the output head runs over `chunk_tokens(V)` of them at a time, each
chunk's lm_head + cross-entropy under activation checkpointing: its logits are freed as soon as its
loss is summed and recomputed in backward, so a step holds one chunk of logits (as torchtune's
chunked cross-entropy and Liger's fused linear cross-entropy do, by recomputation rather than a
fused kernel). A batch whose logits fill at most `ONE_PASS_CHUNKS` chunks takes a single pass,
without the recompute: on SmolLM2 (vocabulary 49,152) the head is a fifth of a step's compute, and
recomputing it cost a quarter of the step for a saving of one small chunk.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from .data import IGNORE_INDEX

LOGIT_CHUNK_BYTES = 128 * 2**20  # the fp32 logits of one chunk: 261 tokens of Llama 3's 128,256, 1,048 of Llama 2's 32,000
ONE_PASS_CHUNKS = 2  # logits of up to this many chunks are taken in one pass, without the recompute


def chunk_tokens(vocab_size: int) -> int:
    """Supervised tokens per chunk: as many as `LOGIT_CHUNK_BYTES` of fp32 logits hold."""
    return max(1, LOGIT_CHUNK_BYTES // (4 * vocab_size))


def held_logit_tokens(tokens: int, vocab_size: int) -> int:
    """How many of a batch's `tokens` supervised tokens have their logits held at once: all of them
    in one pass when they fill at most ONE_PASS_CHUNKS chunks, else one chunk."""
    step = chunk_tokens(vocab_size)
    return tokens if tokens <= ONE_PASS_CHUNKS * step else step


def supervised_token_losses(model: PreTrainedModel, inputs: dict[str, torch.Tensor],
                            reduction: str = "sum") -> tuple[torch.Tensor, torch.Tensor]:
    """CE(lm_head(h_t), y_{t+1}) at the positions t whose next token carries loss: summed
    (`reduction="sum"`) or one a token ("none", in the mask's row-major order); and the
    [rows, length − 1] mask of those positions.

    Models whose logits are not lm_head(hidden) (soft-capping, scaling) take the full forward.
    """
    targets = inputs["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    targets = targets[mask]
    tokens = {key: inputs[key] for key in ("input_ids", "attention_mask", "position_ids") if key in inputs}
    if not plain_logits(model):
        logits = model(**tokens, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1][mask].float(), targets, reduction=reduction), mask
    hidden = model.get_decoder()(**tokens, use_cache=False).last_hidden_state[:, :-1][mask]
    head = model.get_output_embeddings()
    step = held_logit_tokens(len(targets), head.weight.shape[0])
    if step == len(targets):  # one pass: nothing freed before backward, so nothing recomputed
        return head_cross_entropy(head, hidden, targets, reduction), mask
    losses = [checkpoint(head_cross_entropy, head, hidden[start:start + step], targets[start:start + step],
                         reduction, use_reentrant=False, preserve_rng_state=False)
              for start in range(0, len(targets), step)]
    return (torch.stack(losses).sum() if reduction == "sum" else torch.cat(losses)), mask


def head_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                       reduction: str) -> torch.Tensor:
    """CE(head(h), y) in fp32, whatever the compute dtype."""
    return F.cross_entropy(head(hidden).float(), targets, reduction=reduction)


def supervised_loss(model: PreTrainedModel, inputs: dict[str, torch.Tensor],
                    num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """The causal-LM loss Σ CE(lm_head(h_t), y_{t+1}) / N over the supervised tokens.

    N is `num_items` (the accumulated batch's count, as Trainer passes it) or this batch's count
    of supervised tokens.
    """
    loss, mask = supervised_token_losses(model, inputs)
    return loss / (num_items if num_items is not None else mask.sum().clamp_min(1))


def row_log_likelihoods(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's Σ_t log p(y_{t+1} | y_≤t) over its supervised tokens, and their count; the rows
    of a flattened batch (one sequence whose `position_ids` restart at each row) told apart."""
    losses, mask = supervised_token_losses(model, inputs, reduction="none")
    row_of = row_numbers(inputs)[:, 1:]
    rows = row_of[mask]
    count = int(row_of.max()) + 1
    sums = torch.zeros(count, device=losses.device, dtype=losses.dtype).index_add_(0, rows, -losses)
    return sums, torch.bincount(rows, minlength=count)


def row_numbers(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The row each token belongs to: its batch row, or in a flattened batch the row whose
    `position_ids` restart last at or before it."""
    ids = inputs["input_ids"]
    positions = inputs.get("position_ids")
    if ids.shape[0] == 1 and positions is not None:
        return (positions == 0).cumsum(dim=1).sub(1).clamp_min(0)
    return torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)


def plain_logits(model: PreTrainedModel) -> bool:
    """Whether the model's logits are lm_head(hidden) with nothing after (no soft-capping or scaling)."""
    config = model.config
    return (model.get_output_embeddings() is not None and
            not any(getattr(config, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling")))
