"""How tokenized rows become training batches (`--batching`), so that little compute goes to padding.

- padded: a batch of shuffled rows, each padded to the longest (`data.collator`);
- grouped: the same, with rows of similar length together (`LengthGroupedSampler`), in an order
  seeded by --seed and the epoch: every epoch sees every row once, and a resumed run the same order;
- padding-free: a batch's rows concatenated into one sequence [1, Σ lengths] with no pad token,
  `position_ids` restarting at each row and each row's first label ignored (no row predicts the
  next one's first token). transformers builds a block-diagonal causal mask from the restarts (sdpa,
  eager) or runs flash-attention's varlen kernels, so no row attends to another;
- packed: whole rows packed best-fit decreasing into sequences of at most --seq-len tokens (no row
  cut), a batch of them flattened as padding-free.

`auto` takes padding-free on a CUDA GPU, where flash-attention 2's varlen kernels (a half-precision
dtype, the flash_attn package) or else sdpa's block-diagonal mask skip the padding (an H200 with
sdpa: 1.94× padded's tokens/s for lora, 1.12× for edora, against grouped's 1.06× and 1.09×), and
grouped on a CPU, where sdpa's block-diagonal masks cost more than the padding they save
(benchmarks/throughput.py).
"""

import bisect
from typing import NamedTuple

import datasets
import torch
from transformers import DataCollatorWithFlattening, PreTrainedTokenizerBase
from transformers.utils import is_flash_attn_2_available

from .data import IGNORE_INDEX, collator

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


def choose(requested: str, device: torch.device, dtype: torch.dtype) -> Batching:
    """The batching asked for, or for `auto` the fastest for this device."""
    if requested != "auto":
        return Batching(requested, "--batching")
    if device.type == "cuda":
        kernels = "flash-attention's varlen kernels" if flash_attention_runs(device, dtype) else "sdpa's block-diagonal mask"
        return Batching("padding-free", f"no compute on padding with {kernels}; --batching to choose")
    return Batching("grouped", f"the fastest measured on {device.type}; --batching to choose")


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


def batch_collator(tokenizer: PreTrainedTokenizerBase, batching: Batching):
    return FlattenRows() if batching.flattened else collator(tokenizer)


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
