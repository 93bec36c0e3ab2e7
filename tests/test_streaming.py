"""The streaming split, the exact and randomized SVDs, and the prepared-model cache."""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, set_seed

import qsvd
from qsvd import prepared, svd
from qsvd.errors import QSVDError
from qsvd.files import MANIFEST
from qsvd.load import empty_model, resolve_model
from qsvd.methods import make_spec
from qsvd.split import adapter_layers, split_model
from qsvd.weights import open_weights
from conftest import char_tokenizer, tiny_model

IDS = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
RANK = 4


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """The tiny Llama (with biases) saved as several safetensors shards."""
    path = tmp_path_factory.mktemp("sharded")
    tiny_model(bias=True).save_pretrained(path, max_shard_size="100KB")
    char_tokenizer().save_pretrained(path)
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


def streamed(path, method, bits, **options):
    files = resolve_model(str(path))
    model = empty_model(files)
    set_seed(0)
    spec = make_spec(method, RANK, bits=bits, **options)
    model, report = split_model(model, spec, device="cpu", weights=open_weights(files, model), progress=False)
    return model, report


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method,options", [("milora", {}), ("pissa", {"refine_iters": 1}),
                                            ("pissa", {"svd_niter": 2}), ("edora", {}), ("lora", {})])
@pytest.mark.parametrize("bits", [4, 16])
def test_streamed_split_equals_in_memory_split(sharded_dir, method, options, bits):
    model, _ = streamed(sharded_dir, method, bits, **options)
    set_seed(0)
    reference = qsvd.prepare(AutoModelForCausalLM.from_pretrained(sharded_dir), method, bits=bits, rank=RANK,
                             device="cpu", progress=False, **options)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert torch.equal(logits(model), logits(reference))


def test_streaming_from_a_checkpoint_lacking_a_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QSVDError, match="no tensor model.norm.weight"):
        streamed(tmp_path, "lora", 4)


def test_truncated_shard_is_named(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(QSVDError, match="model.safetensors is not a readable safetensors file"):
        streamed(tmp_path, "lora", 4)


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import torch
    from qsvd.load import empty_model, resolve_model
    from qsvd.methods import make_spec
    from qsvd.split import adapter_layers, split_model
    from qsvd.weights import open_weights
    from qsvd.memory import peak_memory_mb

    def rss_mb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    files = resolve_model(sys.argv[1])
    model = empty_model(files)
    before = rss_mb()
    model, _ = split_model(model, make_spec("lora", 8, bits=4), device="cpu",
                           weights=open_weights(files, model), progress=False)
    peak = peak_memory_mb(torch.device("cpu"))
    frozen = sum(t.numel() * t.element_size() for layer in adapter_layers(model).values()
                 for t in layer.base.state_dict().values())
    others = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".base." not in name)
    print(json.dumps({"growth_mb": peak - before, "frozen_mb": frozen / 2**20, "others_mb": others / 2**20}))
""")


def test_streaming_peak_memory_is_bounded_by_layer_sizes(tmp_path):
    """Streaming a sharded bf16 checkpoint grows the peak RSS by the quantized model, the fp32
    non-target tensors and a few fp32 copies of the largest layer: below even the bf16 model."""
    config = LlamaConfig(vocab_size=2000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="40MB")
    char_tokenizer().save_pretrained(tmp_path)
    fp32_model_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    largest_layer_mb = 1024 * 2816 * 4 / 2**20
    del model
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True,
                            text=True, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    bound = figures["frozen_mb"] + figures["others_mb"] + 6 * largest_layer_mb + 32
    assert bound < 0.5 * fp32_model_mb  # the bound means something: it is below even the bf16 model
    assert figures["growth_mb"] < bound, (figures, bound)


def spectrum_matrix(out_features, in_features, seed=0):
    """A matrix with distinct singular values from 10 down to 1e-3 (condition number 1e4)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(out_features, in_features)
    u, _ = torch.linalg.qr(torch.randn(out_features, k, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, k, generator=generator, dtype=torch.float64))
    s = torch.logspace(1, -3, k, dtype=torch.float64)
    return (u * s) @ v.T, s


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_gram_bottom_triplets_match_a_full_svd(shape):
    weight64, exact = spectrum_matrix(*shape)
    u, s, vh = svd.bottom_triplets(weight64.float(), 8)
    fu, fs, fvh = svd._full_svd(weight64.float())
    assert torch.allclose(s.double(), exact[-8:], rtol=1e-4)  # as exact as the fp32 input allows
    assert torch.allclose(s, fs[-8:], rtol=1e-3)
    full_product = (fu[:, -8:] * fs[-8:]) @ fvh[-8:]
    assert torch.allclose((u * s) @ vh, full_product, atol=1e-6)
    assert torch.allclose(u.T @ u, torch.eye(8), atol=1e-4)
    assert torch.allclose(vh @ vh.T, torch.eye(8), atol=1e-4)


def test_randomized_top_triplets_are_accurate_reproducible_and_leave_the_global_rng_alone():
    weight = spectrum_matrix(200, 120)[0].float()
    state = torch.get_rng_state()
    u, s, vh = svd.top_triplets(weight, 8, niter=4)
    assert torch.equal(torch.get_rng_state(), state)
    eu, es, evh = svd.top_triplets(weight, 8)
    assert torch.allclose(s, es, rtol=1e-4)
    approx, exact = (u * s) @ vh, (eu * es) @ evh
    assert (approx - exact).norm() < 1e-3 * exact.norm()
    assert all(torch.equal(a, b) for a, b in zip((u, s, vh), svd.top_triplets(weight, 8, niter=4)))


def test_randomized_pissa_split_stays_exact():
    model = qsvd.prepare(tiny_model(), "pissa", bits=16, rank=RANK, svd_niter=1, device="cpu", progress=False)
    original = tiny_model()
    for name, layer in adapter_layers(model).items():
        weight = original.get_submodule(name).weight
        assert torch.allclose(layer.base.weight + layer.adapter_delta(), weight, atol=1e-6)


def test_refinement_lowers_the_quantization_error_below_qlora():
    _, plain = split_model(tiny_model(), make_spec("pissa", RANK, bits=4), device="cpu", progress=False)
    _, refined = split_model(tiny_model(), make_spec("pissa", RANK, bits=4, refine_iters=3), device="cpu",
                             progress=False)
    assert refined.ratio < plain.ratio < 1
    assert "× plain QLoRA's" in refined.line()


def test_quantization_report_measures_the_split_and_qlora_on_sampled_rows(monkeypatch):
    from functools import partial

    from qsvd import quantize
    from qsvd.split import QuantizationReport, layer_splitter

    weight = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0)) * 0.02
    split_layer, _ = layer_splitter(make_spec("pissa", RANK, bits=4), torch.device("cpu"))
    layer = split_layer(weight, None)
    roundtrip = partial(quantize.roundtrip, bits=4, dtype=torch.float32)
    exact = QuantizationReport((weight - layer.base_weight() - layer.adapter_delta()).square().sum().item(),
                               (weight - roundtrip(weight)).square().sum().item())
    frozen = type(layer).frozen_weight(weight, dict(layer.state_dict()), layer.spec)
    for sample, tolerance in [(weight.numel(), 1e-5), (weight.numel() // 4, 0.03)]:  # every row; every 4th
        monkeypatch.setattr("qsvd.split.REPORT_SAMPLE", sample)
        report = QuantizationReport()
        report.add(weight, frozen, roundtrip)
        assert report.error_sq == pytest.approx(exact.error_sq, rel=tolerance)
        assert report.qlora_error_sq == pytest.approx(exact.qlora_error_sq, rel=tolerance)
        assert report.ratio == pytest.approx(exact.ratio, rel=tolerance)
        assert 0.5 < report.ratio < 1  # the top singular part in 16 bits lowers the error


@pytest.mark.parametrize("method,options,message", [
    ("milora", {"svd_niter": 2}, "--svd-niter .* not milora"),
    ("lora", {"svd_niter": 2}, "--svd-niter .* not lora"),
    ("pissa", {"svd_niter": -1}, "--svd-niter takes a count"),
])
def test_bad_svd_niter(method, options, message):
    with pytest.raises(QSVDError, match=message):
        make_spec(method, RANK, **options)


def load_or_split(path, method="milora", **options):
    set_seed(0)
    spec = make_spec(method, RANK, bits=4, **options)
    return prepared.load_or_split(resolve_model(str(path)), spec, seed=0, device="cpu", progress=False)


def test_prepared_model_reloads_to_identical_logits_without_svd_or_quantization(sharded_dir, capsys,
                                                                                 monkeypatch):
    model, path = load_or_split(sharded_dir)
    assert "prepared model saved" in capsys.readouterr().err
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["key"]["method"] == "milora" and manifest["key"]["rank"] == RANK
    assert manifest["key"]["targets"] == model.qsvd_targets
    assert manifest["quantization_report"]["ratio"] > 0

    def forbidden(*args, **kwargs):
        raise AssertionError("a reload must not run an SVD or quantize")

    for name in ("_full_svd", "bottom_triplets", "top_triplets"):
        monkeypatch.setattr(svd, name, forbidden)
    monkeypatch.setattr(qsvd.quantize, "freeze", forbidden)
    reloaded, same_path = load_or_split(sharded_dir)
    assert same_path == path and "reusing the prepared model" in capsys.readouterr().err
    assert torch.equal(logits(reloaded), logits(model))
    assert reloaded.qsvd_targets == model.qsvd_targets


def corrupt_a_shard(path):
    shard = path / "layers-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100:] = bytes(100)
    shard.write_bytes(bytes(data))


def truncate_a_shard(path):
    shard = path / "layers-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])


def delete_a_shard(path):
    (path / "layers-00001.safetensors").unlink()


def change_manifest_source(path):
    manifest_file = path / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["key"]["source"] = "0" * 16
    manifest_file.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage,problem", [(corrupt_a_shard, "does not match its checksum"),
                                            (truncate_a_shard, "does not match its checksum"),
                                            (delete_a_shard, "incomplete (layers-00001.safetensors is missing)"),
                                            (change_manifest_source, "made for another model")])
def test_damaged_prepared_model_is_detected_and_rebuilt(sharded_dir, capsys, damage, problem):
    model, path = load_or_split(sharded_dir, "pissa")
    damage(path)
    capsys.readouterr()
    rebuilt, _ = load_or_split(sharded_dir, "pissa")
    err = capsys.readouterr().err
    assert problem in err and "rebuilding it" in err and "prepared model saved" in err
    assert prepared.check_prepared(path, json.loads((path / MANIFEST).read_text())["key"]) is None
    assert torch.equal(logits(rebuilt), logits(model))


def test_init_checks_the_checksums_of_what_it_finds_prepared(sharded_dir, capsys):
    path = qsvd.init(model=str(sharded_dir), method="pissa", rank=RANK, bits=4, seed=0)
    corrupt_a_shard(path)
    capsys.readouterr()
    assert qsvd.init(model=str(sharded_dir), method="pissa", rank=RANK, bits=4, seed=0) == path
    err = capsys.readouterr().err
    assert "does not match its checksum" in err and "rebuilding it" in err and "already prepared" not in err


def test_a_reuse_reads_each_shard_once_checking_it_in_that_pass(sharded_dir, monkeypatch):
    monkeypatch.setattr(prepared, "SHARD_BYTES", 20_000)  # a shard a layer or two
    model, path = load_or_split(sharded_dir, "pissa")
    shards = sorted(path.glob("layers-*.safetensors"))
    assert len(shards) > 4
    read = []
    real_read_bytes = type(path).read_bytes
    monkeypatch.setattr(type(path), "read_bytes", lambda self: read.append(self.name) or real_read_bytes(self))
    monkeypatch.setattr(prepared, "file_sha256", lambda *_: pytest.fail("a reuse hashes in its one read"))
    reloaded, _ = load_or_split(sharded_dir, "pissa")
    assert [name for name in read if name.startswith("layers-")] == [shard.name for shard in shards]
    assert torch.equal(logits(reloaded), logits(model))


def test_prefetch_is_only_a_hint(tmp_path):
    from qsvd.files import prefetch

    (tmp_path / "a").write_bytes(b"x" * 10)
    prefetch([tmp_path / "missing", tmp_path / "a"])  # a file gone is for the read that follows to tell
    assert (tmp_path / "a").read_bytes() == b"x" * 10


def test_read_ahead_keeps_the_order_and_raises_what_a_read_raises():
    from qsvd.files import read_ahead

    assert list(read_ahead(range(5), lambda i: i * i)) == [(i, i * i) for i in range(5)]
    assert list(read_ahead([], lambda i: i)) == []

    def read(i):
        if i == 2:
            raise ValueError("bad 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad 2"):
        for key, _ in read_ahead(range(5), read):
            got.append(key)
    assert got == [0, 1]


def test_another_model_or_setup_never_reuses_a_prepared_model(sharded_dir, tmp_path):
    _, path = load_or_split(sharded_dir, "lora")
    other = tmp_path / "other"
    tiny_model(seed=1, bias=True).save_pretrained(other, max_shard_size="100KB")  # same config, other weights
    char_tokenizer().save_pretrained(other)
    _, other_path = load_or_split(other, "lora")
    assert other_path != path
    set_seed(1)  # lora's random init depends on the seed, so the seed is part of the key
    spec = make_spec("lora", RANK, bits=4)
    _, seeded_path = prepared.load_or_split(resolve_model(str(sharded_dir)), spec, seed=1, device="cpu", progress=False)
    assert seeded_path != path


def test_init_streams_to_disk_the_same_prepared_model_a_split_writes(sharded_dir, capsys):
    path = qsvd.init(model=str(sharded_dir), method="loraxs", rank=RANK, bits=4, seed=0)
    assert "prepared model saved" in capsys.readouterr().err
    shards = {shard: (path / shard).read_bytes() for shard in
              json.loads((path / MANIFEST).read_text())["sha256"]}
    shutil.rmtree(path)
    _, rebuilt = load_or_split(sharded_dir, "loraxs")  # the in-memory split, saved
    assert rebuilt == path
    assert {shard: (path / shard).read_bytes() for shard in shards} == shards
