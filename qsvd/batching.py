"""How tokenized rows become training batches (`--batching`), so that little compute goes to padding.

- padded: a batch of shuffled rows, each padded to the longest (`data.collator`);
- grouped: the same, with rows of similar length together (`LengthGroupedSampler`), in an order
  seeded by --seed and the epoch: every epoch sees every row once, and a resumed run the same order;
- padding-free: a batch's rows concatenated into one sequence [1, Σ lengths] with no pad token,
  `position_ids` restarting at each row and each row's first label ignored (no row predicts the
  next one's first token), so no row attends to another (below);
- packed: whole rows packed best-fit decreasing into sequences of at most --seq-len tokens (no row
  cut), a batch of them flattened as padding-free.

A flattened batch's attention computes nothing across rows where the model allows: flash-attention
2's varlen kernels where they run (a CUDA GPU, a half-precision dtype, the flash_attn package), else,
for a model on sdpa, sdpa row by row (`rows_attention`) rather than through the [Σ lengths]²
block-diagonal mask transformers builds from the restarts, which costs a CPU more than the padding
saves. A model on eager attention (Gemma-2, for its soft-capping) would take that mask. `auto` takes
padding-free where rows attend alone, the fastest measured on a CPU and on a GPU
(benchmarks/throughput.py), and grouped otherwise.
"""

import bisect
from typing import NamedTuple

import datasets
import torch
from transformers import AttentionInterface, DataCollatorWithFlattening, PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.utils import is_flash_attn_2_available

from .data import IGNORE_INDEX, PAIR_FIELDS, collator

BATCHINGS = ("auto", "padded", "grouped", "padding-free", "packed")
FLATTENED = ("padding-free", "packed")  # one sequence a batch, rows told apart by position_ids
GROUPED_WINDOW = 50  # batches sorted by length together (as Trainer's grouping)


class Batching(NamedTuple):
    name: str  # one of BATCHINGS but auto
    why: str  # how it was picked, as `qsvd finetune` says it

    @property
    def flattened(self) -> bool:
        return self.name in FLATTENED

    def line(self) -> str:
        return f"batching: {self.name} ({self.why})"


def flash_attention_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash-attention 2's varlen kernels can run here: a CUDA GPU, fp16 or bf16, flash_attn installed."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and is_flash_attn_2_available()


def choose(requested: str, device: torch.device, dtype: torch.dtype, attention: str) -> Batching:
    """The batching asked for, or for `auto` the fastest for this device and a model on `attention`
    (its attention implementation): padding-free where its rows can attend alone (`row_attention`),
    else grouped by length."""
    if requested != "auto":
        return Batching(requested, "--batching")
    alone = row_attention(device, dtype, attention)
    if alone is None:
        return Batching("grouped", f"the model's {attention} attention would attend across a flattened batch's "
                                   f"rows; --batching to choose")
    return Batching("padding-free", f"no compute on padding, attention by {ROW_ATTENTION_WORDS[alone]}; "
                                    f"--batching to choose")


def row_bounds(query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None) -> list[int] | None:
    """Where each row of a flattened batch starts (and the last ends): its positions restart at 0.
    None for any other batch: several sequences, no positions, a cache, or one row."""
    if position_ids is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return starts + [query.shape[2]] if len(starts) > 1 and starts[0] == 0 else None


def rows_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """A flattened batch's attention one row at a time, each causal with no mask, as
    flash-attention's varlen kernels do: no [Σ lengths]² block-diagonal mask, and no compute across
    rows. Any other batch, or a row longer than a sliding-window layer's window (which the mask
    holds), goes to sdpa with its mask, as transformers runs it."""
    bounds = row_bounds(query, key, position_ids)
    window = kwargs.get("sliding_window") or query.shape[2]
    if bounds is None or max(end - start for start, end in zip(bounds, bounds[1:])) > window:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                   None, **kwargs)[0] for start, end in zip(bounds, bounds[1:])]
    return torch.cat(rows, dim=1), None


ROWS_ATTENTION = "sdpa_rows"
AttentionInterface.register(ROWS_ATTENTION, rows_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ROWS_ATTENTION, sdpa_mask)  # the masks of other batches, as sdpa's
ROW_ATTENTION_WORDS = {"flash_attention_2": "flash-attention's varlen kernels", ROWS_ATTENTION: "sdpa row by row"}


def row_attention(device: torch.device, dtype: torch.dtype, attention: str) -> str | None:
    """The attention under which a flattened batch's rows attend alone, for a model on `attention`:
    flash-attention's varlen kernels where they run, else sdpa row by row for a model on sdpa; None
    for a model on eager attention (Gemma-2, for its soft-capping), which would take the
    block-diagonal mask."""
    if flash_attention_runs(device, dtype):
        return "flash_attention_2"
    return ROWS_ATTENTION if attention in ("sdpa", ROWS_ATTENTION) else None


def attend_rows_alone(model: PreTrainedModel, batching: Batching, dtype: torch.dtype) -> None:
    """For flattened batches, set the model's `row_attention`, where it has one."""
    alone = row_attention(model.device, dtype, model.config._attn_implementation) if batching.flattened else None
    if alone is not None:
        model.set_attn_implementation(alone)


class FlattenRows(DataCollatorWithFlattening):
    """A batch's rows as one sequence [1, Σ lengths]: `position_ids` restart at each row (or, for
    packed rows, are their own), and each row's first label is IGNORE_INDEX."""

    def __init__(self):
        super().__init__(separator_id=IGNORE_INDEX)

    def __call__(self, features, return_tensors=None, separator_id=None):
        batch = super().__call__(features, return_tensors, separator_id)
        if "position_ids" in features[0]:
            batch["position_ids"] = torch.tensor([[p for feature in features for p in feature["position_ids"]]])
        return batch


class PairCollator:
    """A batch of B pairs as the 2B rows [chosen…, rejected…], collated by `collate_rows`; with
    `reference` (the starting model's log-likelihoods, `objectives.reference_log_likelihoods`) in
    the same order."""

    def __init__(self, collate_rows):
        self.collate_rows = collate_rows

    def __call__(self, features: list[dict]) -> dict:
        rows = [{"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                for side in PAIR_FIELDS for f in features]
        batch = self.collate_rows(rows)
        if "reference_chosen" in features[0]:
            batch["reference"] = torch.tensor([f[f"reference_{side}"] for side in PAIR_FIELDS for f in features],
                                              dtype=torch.float64)
        return batch


def batch_collator(tokenizer: PreTrainedTokenizerBase, batching: Batching, pairs: bool = False):
    """The collator of rows as `batching` batches them; with `pairs`, of preference pairs, each as two rows."""
    rows = FlattenRows() if batching.flattened else collator(tokenizer)
    return PairCollator(rows) if pairs else rows


def pack(rows: datasets.Dataset, seq_len: int) -> datasets.Dataset:
    """Whole rows packed best-fit decreasing into sequences of at most `seq_len` tokens: the longest
    row first, each into the pack with the least room that still holds it, else into a new one.
    A pack's labels ignore the first token of each of its rows; its position_ids restart at each."""
    lengths = [len(ids) for ids in rows["input_ids"]]
    packs: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens free, pack index), ascending
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(room, (lengths[index], -1))
        if at == len(room):
            packs.append([])
            free, chosen = seq_len, len(packs) - 1
        else:
            free, chosen = room.pop(at)
        packs[chosen].append(index)
        bisect.insort(room, (free - lengths[index], chosen))
    input_ids, labels = rows["input_ids"], rows["labels"]
    return datasets.Dataset.from_dict({
        "input_ids": [[t for i in pack for t in input_ids[i]] for pack in packs],
        "labels": [[t for i in pack for t in [IGNORE_INDEX, *labels[i][1:]]] for pack in packs],
        "position_ids": [[p for i in pack for p in range(lengths[i])] for pack in packs],
    })


def training_examples(rows: datasets.Dataset, batching: Batching, seq_len: int) -> datasets.Dataset:
    """What Trainer iterates over: the rows, or for `packed` their packs."""
    return pack(rows, seq_len) if batching.name == "packed" else rows


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Rows of similar length in each batch of `batch_size`: a shuffled order of every row is cut
    into windows of GROUPED_WINDOW batches, each window sorted by length and cut into batches, and
    the batches are shuffled (the epoch's last, partial one last, so that every other is whole).
    The order is drawn from `seed` and the epoch alone, so that every process, and a run resumed
    after a kill, sees the same. (Trainer's own grouping shrinks its windows on small data, to one
    batch below 4 × 50 of them, and walks each window from its longest batch to its shortest.)"""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        self.batch_size, self.lengths, self.seed, self.epoch = batch_size, lengths, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        window = self.batch_size * GROUPED_WINDOW
        batches = []
        for start in range(0, len(order), window):
            by_length = sorted(order[start:start + window], key=lambda i: self.lengths[i])
            batches += [by_length[i:i + self.batch_size] for i in range(0, len(by_length), self.batch_size)]
        whole = len(order) // self.batch_size
        for index in [*torch.randperm(whole, generator=generator).tolist(), *range(whole, len(batches))]:
            yield from batches[index]


def example_lengths(rows: datasets.Dataset) -> list[int]:
    """The tokens of each example: a row's, or a preference pair's two rows together."""
    if is_pairs(rows):
        return [len(c) + len(r) for c, r in zip(rows["chosen_input_ids"], rows["rejected_input_ids"])]
    return [len(ids) for ids in rows["input_ids"]]


def is_pairs(rows: datasets.Dataset) -> bool:
    """Whether tokenized rows are preference pairs."""
    return "chosen_input_ids" in rows.column_names
