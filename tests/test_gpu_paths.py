"""What a GPU run does differently, reached on this CPU by faking what it lacks (a GPU count, a
compute capability): one process per GPU, TF32, dtypes the GPU has, LLM.int8's threshold, fp16
loss scaling in LoRA-SB's estimate, the split's routes, and the memory a GPU counts and plans.
(Two processes under DDP: tests/test_multiprocess.py.)"""

import functools
import json
import logging

import bitsandbytes.functional as bnbF
import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, TrainingArguments

import qsvd
from qsvd import memory, quantize, svd
from qsvd.cli import cli
from qsvd.methods import lorasb
from qsvd.plan import NCCL_MIB, Setup, budget
from qsvd.devices import compute_dtype
from qsvd.methods import make_spec
from qsvd.split import adapter_layers
from qsvd.train import tf32_matmuls
from conftest import fake_gpus, tiny_model


def test_a_host_with_two_gpus_trains_one_process_without_data_parallel(tiny_model_dir, tmp_path, monkeypatch):
    """Trainer counts a host's GPUs and wraps a model that does not call itself quantized in
    nn.DataParallel, whose replicas lose the 4-bit quantization state, and multiplies the batch by
    the count; qsvd's process drives one device. Faked: Trainer's GPU count is 2."""
    setup_devices = TrainingArguments._setup_devices.func

    def two_gpus(self):
        device = setup_devices(self)
        self._n_gpu = 2
        return device

    faked = functools.cached_property(two_gpus)
    faked.__set_name__(TrainingArguments, "_setup_devices")
    monkeypatch.setattr(TrainingArguments, "_setup_devices", faked)
    wrapped = []

    class DataParallel(torch.nn.DataParallel):  # on a CPU, a wrapper that passes every call through
        def __init__(self, module, *args, **kwargs):
            wrapped.append(module)
            super().__init__(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn, "DataParallel", DataParallel)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": f"{i + 1}"}) + "\n" for i in range(8)))
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--data", str(data), "--method", "edora",
                                      "--rank", "4", "--batch-size", "2", "--max-steps", "1", "--output",
                                      str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert wrapped == []
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["epoch"] == 0.25  # 2 of the 8 rows: the batch is not multiplied by the GPU count


def test_fp32_training_on_a_gpu_multiplies_in_tf32_and_nothing_else_does():
    assert not torch.backends.cuda.matmul.allow_tf32  # torch's default, which the split keeps
    with tf32_matmuls(torch.device("cuda"), torch.float32):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.backends.cuda.matmul.allow_tf32
    for device, dtype in [("cuda", torch.bfloat16), ("cpu", torch.float32)]:
        with tf32_matmuls(torch.device(device), dtype):
            assert not torch.backends.cuda.matmul.allow_tf32


def test_bf16_is_refused_on_a_gpu_without_it(monkeypatch, tiny_model_dir, tmp_path):
    """A T4 (7.5) emulates bf16 slowly: --dtype bf16 is refused before anything is written, auto
    takes fp16, and the plan refuses it too."""
    fake_gpus(monkeypatch, capability=(7, 5), name="Tesla T4")
    with pytest.raises(qsvd.QSVDError, match=r"--dtype bf16: Tesla T4 \(compute capability 7.5\) has no bf16"):
        compute_dtype(torch.device("cuda"), make_spec("edora", 4, dtype="bf16"))
    assert compute_dtype(torch.device("cuda"), make_spec("edora", 4)) == torch.float16
    result = CliRunner().invoke(cli, ["finetune", "--model", str(tiny_model_dir), "--dtype", "bf16",
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has no bf16" in result.output
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(cli, ["plan", "--model", "llama-7b", "--gpu", "t4", "--dtype", "bf16"])
    assert result.exit_code == 2 and "a t4 has no bf16" in result.output


def test_int8_layers_keep_llm_int8_outliers_and_its_cast_notice_is_quiet(caplog):
    """transformers' 8-bit default: input columns above 6.0 multiply in fp16 on a GPU instead of
    being rounded to int8; bitsandbytes' notice that it casts bf16 inputs to fp16, given on every
    forward, is not shown."""
    layer = quantize.freeze(torch.randn(64, 32), None, 8, torch.float32, "cpu")
    assert layer.state.threshold == quantize.INT8_THRESHOLD == 6.0
    restored = quantize.load_frozen(layer.state_dict(), 8, torch.float32, "cpu")
    assert restored.state.threshold == 6.0
    logger = logging.getLogger(qsvd.notices.BNB_MATMUL_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.bfloat16)
        logger.warning("another notice")
    assert [record.getMessage() for record in caplog.records] == ["another notice"]


def lorasb_gradients(dtype: str, batches) -> dict[str, torch.Tensor]:
    """LoRA-SB's G on the tiny model with its head scaled by 1e-3: per-token gradients of 1e-7."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e-3)
    model = qsvd.prepare(model, "lorasb", bits=16, rank=4, dtype=dtype, device="cpu", progress=False,
                         grad_batches=batches, lr=1e-3)
    return lorasb.estimate_gradients(model, adapter_layers(model), batches)


def sign_agreement(grads, reference) -> float:
    same = sum((torch.sign(grads[name]) == torch.sign(g)).sum().item() for name, g in reference.items())
    return same / sum(g.numel() for g in reference.values())


def test_lorasb_estimate_in_fp16_scales_its_loss_so_small_gradients_keep_their_sign(monkeypatch):
    """fp16 (a T4's dtype) gives fp32's sign(G) on ≥ 99% of the entries; unscaled, the same
    gradients underflow and agree far less. A first scale that overflows fp16 halves until it
    fits, the layers already taken not taken twice."""
    ids = torch.randint(4, 100, (4, 64), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": ids}]
    reference = lorasb_gradients("fp32", batches)
    assert sign_agreement(lorasb_gradients("fp16", batches), reference) >= 0.99
    monkeypatch.setattr(lorasb, "INIT_LOSS_SCALE", 2.0**40)
    assert sign_agreement(lorasb_gradients("fp16", batches), reference) >= 0.99
    monkeypatch.setattr(lorasb, "INIT_LOSS_SCALE", 1.0)
    assert sign_agreement(lorasb_gradients("fp16", batches), reference) < 0.9


def test_adapters_under_autocast_keep_no_fp32_copy_of_their_input():
    """Training in bf16 runs under autocast: the adapters multiply in bf16 and save for backward
    only what the frozen layer saves, never a float32 copy of x (which on a GPU would cost a
    block's inputs again in fp32 for every adapter)."""
    model = qsvd.prepare(tiny_model(), "edora", bits=16, rank=4, dtype="bf16", device="cpu", progress=False)
    layer = adapter_layers(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 8, layer.in_features, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).sum().backward()
    assert saved and not [t for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()]


def test_the_split_takes_gram_matrices_on_a_gpu_and_an_fp32_svd_where_float64_is_slow(monkeypatch):
    """Top r from the fp32 Gram matrix (a GPU's route, no full SVD) and bottom r from a full fp32
    SVD (consumer GPUs' route) equal the CPU's routes to fp32's accuracy."""
    torch.manual_seed(0)
    weight = torch.randn(96, 160) @ torch.diag(torch.logspace(0, -2, 160))

    def close(a, b):
        ua, sa, vha = a
        ub, sb, vhb = b
        assert torch.allclose(sa, sb, rtol=1e-4)
        assert torch.allclose((ua * sa) @ vha, (ub * sb) @ vhb, atol=1e-4 * sb[0])

    close(svd.gram_triplets(weight, 5, largest=True, dtype=torch.float32), svd.top_triplets(weight, 5))
    bottom = svd.bottom_triplets(weight, 5)  # the CPU's: the float64 Gram matrix
    monkeypatch.setattr(svd, "fast_float64", lambda device: False)
    close(svd.bottom_triplets(weight, 5), bottom)
    monkeypatch.undo()
    fake_gpus(monkeypatch, capability=(7, 5))
    assert not svd.fast_float64(torch.device("cuda"))  # a T4: float64 at 1/32
    fake_gpus(monkeypatch, capability=(8, 0))
    assert svd.fast_float64(torch.device("cuda")) and svd.fast_float64(torch.device("cpu"))


def test_a_gpu_peak_counts_the_allocators_hold_and_the_paged_optimizer_state(monkeypatch):
    """max_memory_allocated misses what torch's allocator keeps cached and bitsandbytes' paged
    state (CUDA managed memory that torch never sees); the split's cache goes back to the driver."""
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 100 * 2**20)
    paged = bnbF.GlobalPageManager.get_instance().paged_tensors
    monkeypatch.setattr(bnbF.GlobalPageManager.get_instance(), "paged_tensors", [*paged, torch.zeros(2**18)])
    assert memory.peak_memory_mb(torch.device("cuda")) == 101
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    memory.return_freed_memory(collect=True)
    memory.return_freed_memory()  # after each layer: no
    assert emptied == [True]


def test_the_plan_counts_what_a_gpu_and_several_processes_add():
    one = budget(Setup(model="llama-7b", gpu="t4"))
    two = budget(Setup(model="llama-7b", gpu="t4", processes=2))
    assert two["runtime"] - one["runtime"] == NCCL_MIB * 2**20  # each process: its own GPU, plus NCCL
    working_set = max(one["block working set"], one["logits"])  # a step holds one of them at a time
    assert one["allocator cache, training"] == pytest.approx(0.15 * (one["activations"] + working_set))
    cpu_one, cpu_two = (budget(Setup(model="llama-7b", processes=n)) for n in (1, 2))
    same_runtime = cpu_one["training total"] - cpu_one["runtime"] + cpu_two["runtime"]  # this process's RSS moves
    assert cpu_two["training total"] == pytest.approx(2 * same_runtime)  # on a CPU they share the RAM


def test_the_plan_advises_no_fsdp(tmp_path):
    """A 70B model fits no T4, whatever the batch: the advice is a larger GPU, not FSDP, which qsvd refuses."""
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000).save_pretrained(tmp_path)
    result = CliRunner().invoke(cli, ["plan", "--model", str(tmp_path), "--gpu", "t4"])
    assert result.exit_code == 0, result.output
    assert "fits: no" in result.output and "FSDP, which would shard it, is not supported" in result.output
