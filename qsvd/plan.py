"""`qsvd plan`: what a run will need, part by part, from the model's config alone (no weights).

Built on the meta device from config.json (or, for the hub aliases, the shape qsvd knows), so the
target layers' shapes are exact for any architecture. The parts, in bytes:
- frozen targets: NF4 with double quantization 0.5 + 1/64 + 4/(64·256) a weight, int8 1 (+ a
  4-byte scale a row), 16-bit the compute dtype; the other weights in the compute dtype;
- adapter: every adapter tensor in fp32, trainable or not (factors, cores, magnitudes, statistics);
- gradients: 4 a trainable weight; optimizer: paged 8-bit AdamW keeps 2 bytes a weight for
  tensors of 4096 elements or more, 8 below (bitsandbytes' min_8bit_size), AdamW 8;
- activations: each decoder block's input kept for the backward pass (and without gradient
  checkpointing every block's working set); then the larger of two working sets that a step never
  holds together: one block's (recomputed under gradient checkpointing; on a CPU with the attention
  scores, which GPU kernels never hold whole) with the largest quantized layer's weight dequantized
  for its matmul, and the loss's: the supervised tokens' logits in fp32 that a step holds at once
  (`loss.held_logit_tokens`: all of them in one pass, else one chunk; all of them for a model whose
  logits are not lm_head(hidden)), as their log-softmax and its gradient, and in a chunk's
  recompute (or beside the model's own logits) the logits' gradient too: two copies at the peak of one
  pass, three otherwise, as measured on this CPU;
- the split's workspace while the model is prepared: a few fp32 copies of the largest layer, and
  one shard of the prepared model serialized in memory as it is written; `finetune` holds the
  prepared model beside it ("preparation total"), `qsvd init` streams it to disk, reading the
  next layer (fp32) while it splits this one ("init total");
- a merged export (on a CPU, where it always runs): one output shard (1 GiB, bf16) and the fp32
  copies of the largest layer as its update is merged, beside the adapter tensors;
- on a CPU, the process's libraries (this process's own resident memory after its imports) and
  `CPU_SETUP_RESIDUE_MIB` left from loading and splitting; what glibc keeps of freed buffers: during
  training, where qsvd hands freed memory back after each block and each chunk of logits,
  `CPU_STEP_CACHE` of the step's working set; while a layer is split or merged, `CPU_ALLOCATOR_CACHE`
  times its fp32 copies when they are under glibc's largest mmap threshold (larger buffers are
  unmapped when freed); on a GPU, its CUDA context and what torch's caching allocator holds beyond
  the live tensors (`GPU_ALLOCATOR_SLACK` of a step's activations and working set), and with several
  processes NCCL's own buffers (DDP's gradient buckets are the gradients themselves:
  `gradient_as_bucket_view`);
- with several processes, each holds all of this: one GPU each, or on a CPU the same RAM, so a
  CPU plan's totals are for all of them together.
Rows are planned at --seq-len tokens, every one supervised: shorter rows need less.
"""

from dataclasses import dataclass, replace
from typing import NamedTuple

from .config import FinetuneConfig, check_positive, parse_size
from .console import console
from .devices import dtype_rule
from .errors import QSVDError
from .export import SHARD_SIZE
from .load import model_from_config, read_model_config
from .loss import held_logit_tokens, plain_logits
from .memory import status_mb
from .methods import METHODS, make_spec
from .prepared import SHARD_BYTES
from .split import find_targets

class Gpu(NamedTuple):
    mib: int  # nvidia-smi's total
    capability: tuple[int, int]


GPUS = {"t4": Gpu(15_360, (7, 5)), "a10": Gpu(23_028, (8, 6)), "4090": Gpu(24_564, (8, 9)),
        "a100-40": Gpu(40_960, (8, 0)), "h100": Gpu(81_559, (9, 0))}
CUDA_CONTEXT_MIB = 500
GPU_ALLOCATOR_SLACK = 0.15  # torch's cached and split blocks ÷ a step's transient buffers: an estimate, until gpu_check measures one
NCCL_MIB = 300  # NCCL's buffers and its own CUDA context share, a process: an estimate
CPU_ALLOCATOR_CACHE = 2.1  # glibc's kept freed buffers ÷ the live ones while a layer is split or merged, measured
CPU_STEP_CACHE = 0.3  # what glibc keeps between two trims of a step ÷ the step's working set, measured (README: Will it fit?)
CPU_SETUP_RESIDUE_MIB = 64  # heap left after loading and splitting, measured
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc maps larger buffers and unmaps them when freed: none kept
SPLIT_COPIES = 4  # fp32 copies of the largest target while it is split (W, its factors, the residual, Q's input)
MERGE_COPIES = 2  # fp32 copies of the largest target while its update is merged (W, B A)
EXPORT_SHARD_BYTES = parse_size(SHARD_SIZE, "--shard-size")  # `qsvd export`'s default


@dataclass(frozen=True)
class Setup:
    """A run to plan: finetune's options that change its memory, with finetune's defaults."""

    model: str = FinetuneConfig.model
    revision: str | None = FinetuneConfig.revision
    method: str = FinetuneConfig.method
    bits: int = FinetuneConfig.bits
    rank: int = FinetuneConfig.rank
    seq_len: int = FinetuneConfig.seq_len
    batch_size: int = FinetuneConfig.batch_size
    gpu: str | None = None  # None: this machine's CPU
    targets: tuple[str, ...] | None = None
    gradient_checkpointing: bool = FinetuneConfig.gradient_checkpointing
    optim: str = FinetuneConfig.optim
    dtype: str = FinetuneConfig.dtype
    processes: int = 1  # data-parallel processes: one per GPU, or all on this CPU

    @property
    def compute_dtype(self) -> str:
        """finetune's rule (`devices.dtype_rule`), applied to the GPU planned for, or to a CPU."""
        return dtype_rule(self.dtype, GPUS[self.gpu].capability if self.gpu else None, lambda: f"a {self.gpu}")


def frozen_bytes(out_features: int, in_features: int, bits: int, dtype_bytes: int) -> float:
    weights = out_features * in_features
    if bits == 4:
        return weights * (0.5 + 1 / 64 + 4 / (64 * 256))
    if bits == 8:
        return weights + 4 * out_features
    return weights * dtype_bytes


def optimizer_bytes(numel: int, optim: str) -> float:
    if "8bit" in optim and numel >= 4096:
        return 2 * numel * (1 + 4 / 256)  # two uint8 states with a float32 scale per 256-block
    return 8 * numel


def budget(setup: Setup) -> dict[str, float]:
    """Bytes by part, and the training and preparation totals."""
    model = model_from_config(read_model_config(setup.model, setup.revision), setup.model)
    config = model.config
    model.tie_weights()
    spec = make_spec(setup.method, setup.rank, bits=setup.bits, dtype=setup.dtype)
    linears = find_targets(model, setup.targets)
    on_gpu = setup.gpu is not None
    dtype_bytes = 4 if setup.compute_dtype == "fp32" else 2
    layer_cls = METHODS[setup.method]
    target_weights = {id(linear.weight) for linear in linears.values()}
    parts = {"frozen targets": 0.0, "other weights": 0.0, "adapter": 0.0, "gradients": 0.0, "optimizer": 0.0}
    for param in model.parameters():  # tied weights once
        if id(param) not in target_weights:
            parts["other weights"] += param.numel() * dtype_bytes
    for linear in linears.values():
        out_features, in_features = linear.weight.shape
        parts["frozen targets"] += frozen_bytes(out_features, in_features, spec.bits, dtype_bytes)
        tensors = layer_cls.tensor_sizes(out_features, in_features, spec.rank)
        parts["adapter"] += 4 * sum(tensors.values())
        for name in layer_cls.trainable:
            parts["gradients"] += 4 * tensors[name]
            parts["optimizer"] += optimizer_bytes(tensors[name], setup.optim)
    hidden, blocks = config.hidden_size, config.num_hidden_layers
    tokens = setup.batch_size * setup.seq_len
    block_working_set = tokens * (10 * hidden + 4 * config.intermediate_size) * dtype_bytes
    if not on_gpu and setup.batch_size > 1:  # with padding, CPU attention holds the scores, their softmax and its gradient
        block_working_set += 3 * setup.batch_size * config.num_attention_heads * setup.seq_len ** 2 * dtype_bytes
    largest = max(linear.weight.numel() for linear in linears.values())
    dequantized = largest * dtype_bytes if spec.bits < 16 else 0  # a quantized matmul's dequantized weight
    parts["activations"] = blocks * tokens * hidden * dtype_bytes + \
        (0 if setup.gradient_checkpointing else blocks * block_working_set)  # what every block keeps for backward
    parts["block working set"] = dequantized + (block_working_set if setup.gradient_checkpointing else 0)
    logit_tokens = held_logit_tokens(tokens, config.vocab_size) if plain_logits(model) else tokens
    # one pass holds two copies; a chunk's recompute, or the model's own logits, one more
    copies = 2 if plain_logits(model) and logit_tokens == tokens else 3
    parts["logits"] = copies * logit_tokens * config.vocab_size * 4  # log-softmax, its gradient, the logits' gradient
    working_set = max(parts["block working set"], parts["logits"])  # never live together
    split_copies = SPLIT_COPIES * 4 * largest
    parts["split workspace"] = split_copies + min(parts["frozen targets"] + parts["adapter"], SHARD_BYTES)
    if on_gpu:
        parts["runtime"] = (CUDA_CONTEXT_MIB + (NCCL_MIB if setup.processes > 1 else 0)) * 2**20
        parts["allocator cache, training"] = GPU_ALLOCATOR_SLACK * (parts["activations"] + working_set)
    else:
        parts["runtime"] = (status_mb("VmRSS") + CPU_SETUP_RESIDUE_MIB) * 2**20
        parts["allocator cache, training"] = CPU_STEP_CACHE * working_set
        parts["allocator cache, split"] = kept_by_allocator(4 * largest, split_copies)  # the shard: one mmap, returned
    weights = parts["frozen targets"] + parts["other weights"] + parts["adapter"]
    parts["training total"] = weights + parts["gradients"] + parts["optimizer"] + parts["activations"] + \
        working_set + parts["runtime"] + parts["allocator cache, training"]
    parts["preparation total"] = weights + parts["split workspace"] + parts["runtime"] + \
        parts.get("allocator cache, split", 0)
    parts["init total"] = parts["split workspace"] + 4 * largest + parts["runtime"] + \
        parts.get("allocator cache, split", 0)
    if not on_gpu:  # a merged export runs on the CPU: one output shard (bf16), the largest layer merged in fp32
        merge_copies = MERGE_COPIES * 4 * largest
        parts["export total"] = parts["adapter"] + merge_copies + kept_by_allocator(4 * largest, merge_copies) + \
            parts["runtime"] + min(2 * sum(p.numel() for p in model.parameters()), EXPORT_SHARD_BYTES)
    if not on_gpu and setup.processes > 1:  # every process holds a whole model in the same RAM
        parts["training total"] *= setup.processes
    parts["peak"] = max(parts["training total"], parts["preparation total"], parts.get("export total", 0))
    return parts


def kept_by_allocator(buffer_bytes: float, live_bytes: float) -> float:
    """What glibc keeps of freed buffers of this size: a share of them below its mmap threshold, none above."""
    return CPU_ALLOCATOR_CACHE * live_bytes if buffer_bytes < GLIBC_MMAP_THRESHOLD_MAX else 0.0


def capacity_mib(setup: Setup) -> float:
    if setup.gpu is None:
        return status_mb("MemTotal", "/proc/meminfo")
    return GPUS[setup.gpu].mib


def suggestions(setup: Setup) -> list[tuple[str, Setup]]:
    """Changes that need less memory, each on top of the ones before it."""
    steps, current = [], setup
    if not current.gradient_checkpointing:
        current = replace(current, gradient_checkpointing=True)
        steps.append(("gradient_checkpointing: true", current))
    if current.bits != 4:
        current = replace(current, bits=4)
        steps.append(("--bits 4", current))
    while current.batch_size > 1:
        current = replace(current, batch_size=current.batch_size // 2)
        steps.append((f"--batch-size {current.batch_size} (raise --grad-accum to keep the effective batch)", current))
    while current.seq_len > 256:
        current = replace(current, seq_len=current.seq_len // 2)
        steps.append((f"--seq-len {current.seq_len}", current))
    while current.rank > 8:
        current = replace(current, rank=current.rank // 2)
        steps.append((f"--rank {current.rank}", current))
    return steps


def plan(model: str = Setup.model, gpu: str | None = None, **options) -> dict[str, float]:
    """Print the budget of `qsvd plan` and whether it fits; returns the budget in bytes."""
    if gpu is not None and gpu not in GPUS:
        raise QSVDError(f"--gpu {gpu!r} is not one of: {', '.join(GPUS)}")
    setup = Setup(model=model, gpu=gpu, **{k: v for k, v in options.items() if v is not None})
    check_positive({"rank": setup.rank, "seq-len": setup.seq_len, "batch-size": setup.batch_size,
                    "num-processes": setup.processes})
    setup.compute_dtype  # refuses bf16 on a GPU without it
    parts = budget(setup)  # its make_spec checks the method and bits
    capacity = capacity_mib(setup)
    where = f"{setup.gpu} ({capacity:,.0f} MiB)" if setup.gpu else f"this machine's RAM ({capacity:,.0f} MiB)"
    if setup.processes > 1:
        where += f", {setup.processes} processes" + (" (each on its own GPU)" if setup.gpu else "")
    console.print(f"{setup.model}: {setup.method}, {setup.bits}-bit, rank {setup.rank}, batch {setup.batch_size} × "
                  f"seq {setup.seq_len}, compute {setup.compute_dtype}, gradient checkpointing "
                  f"{'on' if setup.gradient_checkpointing else 'off'}, on {where}")
    for name, value in parts.items():
        if name == "training total":
            console.print("  " + "-" * 40 + "\n  (training counts the larger of the block working set and the logits)")
        console.print(f"  {name:<26}{value / 2**20:>10,.0f} MiB")
    fits = parts["peak"] / 2**20 <= capacity
    console.print(f"fits: {'yes' if fits else 'no'} ({parts['peak'] / 2**20:,.0f} of {capacity:,.0f} MiB)")
    if not fits:
        for change, smaller in suggestions(setup):
            peak = budget(smaller)["peak"] / 2**20
            console.print(f"  with {change}: {peak:,.0f} MiB{' - fits' if peak <= capacity else ''}")
            if peak <= capacity:
                break
        else:
            console.print("  no setup here fits: use a larger GPU (data parallel keeps a whole model on each GPU; "
                          "FSDP, which would shard it, is not supported with a 4-bit base)")
    return parts
