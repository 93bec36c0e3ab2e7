"""`qsvd export --format gguf`, checked against readers qsvd did not write: transformers loads the
file back (`gguf_file=`), its tokenizer must give the run's token ids and its logits those of the
`--format merged` export; llama-cpp-python, where it is installed, must generate the same tokens."""

import io
import json
import re
import sys
from itertools import islice
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2Tokenizer)

import qsvd
from qsvd.cli import cli
from qsvd.errors import QSVDError
from qsvd.export import checkpoint_names
from qsvd.devices import DTYPES
from qsvd.export_gguf import EXPORT_TYPES, GGUF_TYPES, byte_level_pre_tokenizer, gguf_architecture, plan_tensors, read_vocabulary
from qsvd.files import host_name
from qsvd.load import ModelFiles

CORPUS = ["Ava has 3 apples. Bob gives her 12 more. How many apples does Ava have now? She has 15.",
          "The quick brown fox jumps over the lazy dog, and 2024 dogs watch it: 'I'll be back', they say."] * 8
STRINGS = ["Ava has 3 apples.", " leading space and  two spaces", "numbers 12345 and 3.14",
           "naïve café — ünïcödé ✅",
           "tabs\tand\nnew lines\n\n", "<|im_start|>user\nhi<|im_end|>", "", "'re 've 'll I'M"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # Llama 3.1's, at a tiny context
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)


def train_bpe(byte_level: bool, vocab_size: int, special_tokens: list[str]) -> dict:
    """A small BPE trained on CORPUS: byte-level (as GPT-2, Qwen2) or sentencepiece-style with byte fallback."""
    if byte_level:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet, special_tokens = [], special_tokens + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return {"vocab": model["vocab"], "merges": [tuple(merge) for merge in model["merges"]]}


def qwen2_tokenizer() -> Qwen2Tokenizer:
    tokenizer = Qwen2Tokenizer(**train_bpe(True, 300, []), unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's tokenizer.json pipeline (sentencepiece's: a space before the text, spaces as ▁), on a small
    vocabulary."""
    tokenizer = Tokenizer(models.BPE(**train_bpe(False, 330, ["<unk>", "<s>", "</s>"]), byte_fallback=True,
                                     unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny(kind: str, **sizes):
    """A random tiny model of `kind` with its tokenizer; Qwen2 with tied embeddings and q/k/v biases;
    `sizes` override SIZES."""
    torch.manual_seed(0)
    sizes = SIZES | sizes
    if kind == "qwen2":
        tokenizer = qwen2_tokenizer()
        config = Qwen2Config(**sizes, vocab_size=320, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
        model = Qwen2ForCausalLM(config)
    else:
        tokenizer = llama_tokenizer()
        config_cls, model_cls = ((LlamaConfig, LlamaForCausalLM) if kind == "llama" else
                                 (MistralConfig, MistralForCausalLM))
        config = config_cls(**sizes, vocab_size=336, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        model = model_cls(config)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):  # a trained model's norms are no ones: the file must keep them exactly
            torch.nn.init.uniform_(param, 0.5, 1.5)
    return model.eval(), tokenizer


def save_and_train(root: Path, model, tokenizer, **options) -> Path:
    """The tiny model and its tokenizer saved in root/model, and a run trained on it in root/run (its
    prepared-model cache in root/cache: a module's fixture runs before the per-test cache is set)."""
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("QSVD_CACHE", str(root / "cache"))
        qsvd.finetune(model=str(root / "model"), rank=4, seq_len=400, output=str(root / "run"), **options)
    return root / "run"


@pytest.fixture(scope="module")
def run(request, tmp_path_factory):
    """One 4-bit edora run on a tiny model of the parametrized kind, and its fp32 merged export."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"gguf-{kind}")
    run_dir = save_and_train(root, *tiny(kind), method="edora", bits=4, max_steps=2, lr=5e-2, batch_size=4)
    return kind, root, qsvd.export(run_dir, root / "merged-fp32", format="merged", dtype="fp32")


def load(model_dir: Path, gguf_file: str | None = None):
    return AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_file, dtype=torch.float32).eval()


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(torch.tensor([[1, 5, 70, 9, 200, 31, 17, 250, 4, 99]])).logits


def biggest_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("run", ["llama", "qwen2"], indirect=True)
@pytest.mark.parametrize("gguf_type", list(GGUF_TYPES))
def test_gguf_loads_in_transformers_with_the_runs_tokenizer_and_logits(run, gguf_type):
    kind, root, merged = run
    path = qsvd.export(root / "run", format="gguf", gguf_type=gguf_type)
    assert path == root / f"run-{gguf_type}.gguf" and not list(root.glob(".*.tmp"))

    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == kind
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_type.upper() and types["blk.0.attn_norm.weight"] == "F32"
    assert ("output.weight" in types) == (kind == "llama")  # tied embeddings are stored once, as llama.cpp does

    ours = AutoTokenizer.from_pretrained(root / "model")
    theirs = AutoTokenizer.from_pretrained(root, gguf_file=path.name)
    for text in STRINGS:
        if kind == "llama" and text.startswith(" "):
            continue  # transformers reads a GGUF sentencepiece vocabulary with no ▁ before a leading space, where
            # sentencepiece, Llama 2's tokenizer.json and llama.cpp put one (the slow llama.cpp test checks it)
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text
    assert theirs.chat_template == ours.chat_template

    exported, full = load(root, path.name), load(merged)
    for name, tensor in exported.state_dict().items():  # the merged export's weights rounded to the type
        assert torch.equal(tensor, rounded(full.state_dict()[name], gguf_type)), name
    gap = biggest_gap(logits(exported), logits(full)) / logits(full).abs().max().item()
    print(f"{kind} {gguf_type}: largest logit gap to the fp32 merge {gap:.2e} of the largest logit")
    assert gap < GAPS[gguf_type]


GAPS = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 3e-2, "q5_1": 1.5e-1, "q5_0": 1.5e-1, "q4_1": 3e-1, "q4_0": 3e-1}


def rounded(weight: torch.Tensor, gguf_type: str) -> torch.Tensor:
    """An fp32 merged weight as the GGUF type stores it: 1-D ones exact (f32), the others rounded to
    f16 or bf16, or quantized and dequantized by gguf's own code."""
    if weight.dim() == 1 or gguf_type in ("f16", "bf16"):
        return weight if weight.dim() == 1 else weight.to(DTYPES[{"f16": "fp16", "bf16": "bf16"}[gguf_type]]).float()
    qtype = GGUF_TYPES[gguf_type][0]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), qtype), qtype))


@pytest.mark.slow
@pytest.mark.parametrize("run", ["llama", "qwen2"], indirect=True)
def test_llama_cpp_reads_the_tokenizer_and_generates_transformers_tokens(run):
    """llama.cpp is the runtime the file is for: its tokenizer and greedy tokens must be transformers'."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    _, root, _ = run
    path = qsvd.export(root / "run", root / "llama-cpp" / "tiny.gguf", format="gguf", overwrite=True)
    ours = AutoTokenizer.from_pretrained(root / "model")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, seed=0, verbose=False)
    for text in STRINGS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ours(text)["input_ids"], text
    prompt = ours(STRINGS[0])["input_ids"]
    with torch.no_grad():
        expected = load(path.parent, path.name).generate(torch.tensor([prompt]), max_new_tokens=12,
                                                         do_sample=False)[0, len(prompt):].tolist()
    assert expected  # at least one token before the end of text
    generated = list(islice(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), len(expected)))
    assert generated == expected


@pytest.mark.slow
@pytest.mark.parametrize("run", ["qwen2"], indirect=True)
def test_qsvd_chat_runs_the_gguf_through_llama_cpp(run):
    """`qsvd chat FILE.gguf`: llama.cpp, with the chat template in the file, answers as transformers
    does from the same file (greedy, f16)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    _, root, _ = run
    path = qsvd.export(root / "run", root / "chat" / "tiny.gguf", format="gguf", overwrite=True)
    answer = qsvd.chat(path, prompt="Ava has 3 apples.", temperature=0, max_new_tokens=8, out=io.StringIO())
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Ava has 3 apples."}],
                                           add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = load(path.parent, path.name).generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert answer == tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A tiny Llama 256 weights wide (a k-quant block: narrower rows fall back to other types), one edora step."""
    root = tmp_path_factory.mktemp("gguf-wide")
    return root, save_and_train(root, *tiny("llama", hidden_size=256, intermediate_size=512), method="edora", bits=4,
                                max_steps=1, lr=5e-2, batch_size=4)


# llama.cpp's k-quant mixes: (most tensors, the ffn_down of the blocks use_more_bits picks: of 2, the last)
K_QUANT_TYPES = {"q6_k": ("Q6_K", "Q6_K"), "q5_k_m": ("Q5_K", "Q6_K"), "q4_k_m": ("Q4_K", "Q6_K")}


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", EXPORT_TYPES)
def test_llama_cpp_runs_every_type_as_transformers_does(wide_run, gguf_type):
    """llama.cpp loads each type's file and generates transformers' greedy tokens from the same file,
    except where its own arithmetic at that type (activations rounded to 8 bits for quantized weights)
    flips a near tie: there transformers' two candidates are within 2% of the largest logit."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    root, run_dir = wide_run
    path = qsvd.export(run_dir, root / f"wide-{gguf_type}.gguf", format="gguf", gguf_type=gguf_type, overwrite=True)
    types = {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(path).tensors}
    most, more = K_QUANT_TYPES.get(gguf_type, (gguf_type.upper(),) * 2)
    assert [types[f"blk.{i}.{name}.weight"] for i, name in ((0, "attn_q"), (0, "ffn_down"), (1, "ffn_down"))] \
        == [most, most, more]
    model, tokenizer = load(root, path.name), AutoTokenizer.from_pretrained(root / "model")
    prompt = tokenizer(STRINGS[0])["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    generated = list(islice(llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0), len(expected)))
    same = next((i for i, (a, b) in enumerate(zip(generated, expected)) if a != b), len(expected))
    print(f"{gguf_type}: llama.cpp's greedy tokens are transformers' for {same} of {len(expected)}")
    if same < len(expected):
        with torch.no_grad():
            scores = model(torch.tensor([prompt + expected[:same]])).logits[0, -1]
        gap = (scores[expected[same]] - scores[generated[same]]).item() / scores.abs().max().item()
        print(f"  first difference: transformers' top token leads llama.cpp's by {gap:.2%} of the largest logit")
        assert gap < 0.02


@pytest.fixture(scope="module")
def llama3_rope_export(tmp_path_factory):
    """A tiny Llama with Llama 3.1's rope scaling, one step of lora, merged (fp32) and as an f16 GGUF."""
    root = tmp_path_factory.mktemp("llama3-rope")
    model, tokenizer = tiny("llama")
    model = LlamaForCausalLM(LlamaConfig(**model.config.to_dict() | {"rope_parameters": LLAMA3_ROPE})).eval()
    run_dir = save_and_train(root, model, tokenizer, method="lora", bits=16, max_steps=1, lr=1e-2, batch_size=2)
    return (qsvd.export(run_dir, root / "merged", format="merged", dtype="fp32"),
            qsvd.export(run_dir, root / "run.gguf", format="gguf"))


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_factors(llama3_rope_export):
    merged, path = llama3_rope_export
    tensors = gguf.GGUFReader(path).tensors
    assert tensors[0].name == "rope_freqs.weight" and tensors[0].tensor_type.name == "F32"
    factors = torch.from_numpy(tensors[0].data.copy())
    trained = load(merged).model.rotary_emb.inv_freq  # the frequencies the model runs with
    default = 1.0 / LLAMA3_ROPE["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    torch.testing.assert_close(default / factors, trained)
    assert factors.min() >= 1 and factors[-1] == pytest.approx(LLAMA3_ROPE["factor"]) and (factors.diff() >= 0).all()


@pytest.mark.slow
def test_llama_cpp_runs_llama3_rope_scaling_as_transformers_does(llama3_rope_export):
    """Past the original context (16) the scaled frequencies matter; llama.cpp's logits must be transformers'."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    merged, path = llama3_rope_export
    ids = [1] + [(7 * i) % 300 + 3 for i in range(127)]
    with torch.no_grad():
        expected = load(merged)(torch.tensor([ids])).logits[0]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.asarray(llm.scores[:len(ids)]).copy())
    # measured: 6.5e-4 of the largest logit (f16 weights); 6.9e-3 with the same file written without rope_freqs
    assert biggest_gap(theirs, expected) < 2e-3 * expected.abs().max()
    assert (theirs.argmax(-1) == expected.argmax(-1)).float().mean() > 0.99


def test_mistral_is_written_as_llama(tmp_path):
    save_and_train(tmp_path, *tiny("mistral"), method="lora", bits=16, max_steps=1, batch_size=2)
    path = qsvd.export(tmp_path / "run", tmp_path / "out" / "mistral.gguf", format="gguf")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "llama"
    merged = qsvd.export(tmp_path / "run", tmp_path / "merged", format="merged", dtype="fp32")
    assert biggest_gap(logits(load(path.parent, path.name)), logits(load(merged))) < 1e-2
    modelfile = (tmp_path / "out" / "mistral.Modelfile").read_text()
    assert modelfile.splitlines()[1].startswith("# No TEMPLATE") and 'FROM ./mistral.gguf' in modelfile
    assert 'PARAMETER stop "</s>"' in modelfile


@pytest.mark.parametrize("run", ["qwen2"], indirect=True)
def test_modelfile_and_cli(run, monkeypatch):
    _, root, _ = run
    result = CliRunner().invoke(cli, ["export", str(root / "run"), "--format", "gguf", "--gguf-type", "q8_0",
                                      "--output", str(root / "cli" / "tiny.gguf")])
    assert result.exit_code == 0, result.output
    modelfile = (root / "cli" / "tiny.Modelfile").read_text()
    assert modelfile.splitlines()[:2] == [f"# edora fine-tune of {root / 'model'}, q8_0 weights, by qsvd "
                                          f"{qsvd.__version__}", "FROM ./tiny.gguf"]
    card = (root / "cli" / "tiny.md").read_text()  # the card beside them names the type too
    assert "library_name: gguf\ntags:\n- qsvd\n- edora\n- gguf\n- q8_0\n" in card
    assert "a GGUF file in q8_0" in card and f"qsvd chat {root / 'cli' / 'tiny.gguf'}" in card
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in modelfile
    assert [line for line in modelfile.splitlines() if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    f16 = qsvd.export(root / "run", root / "cli" / "tiny-f16.gguf", format="gguf", overwrite=True)
    assert (root / "cli" / "tiny.gguf").stat().st_size < 0.75 * f16.stat().st_size  # q8_0: 34 bytes a 32 weights

    before = (root / "cli" / "tiny.gguf").read_bytes()
    again = CliRunner().invoke(cli, ["export", str(root / "run"), "--format", "gguf", "--output",
                                     str(root / "cli" / "tiny.gguf")])
    assert again.exit_code == 2 and "already exists" in again.output
    assert (root / "cli" / "tiny.gguf").read_bytes() == before
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as where the qsvd[llama-cpp] extra is not installed
    for args, message in [(["--output", str(root / "cli" / "tiny.bin")], "named *.gguf"),
                          (["--gguf-type", "q4_k"], "Invalid value for '--gguf-type'"),
                          (["--gguf-type", "q4_k_m"], "--gguf-type q4_k_m needs llama-cpp-python: pip install "
                                                      "'qsvd[llama-cpp]' (it compiles llama.cpp")]:
        result = CliRunner().invoke(cli, ["export", str(root / "run"), "--format", "gguf", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (root / "run-q4_k_m.gguf").exists()


@pytest.mark.parametrize("run", ["qwen2"], indirect=True)
def test_a_failed_export_keeps_the_old_file_and_leaves_no_temporary(run, monkeypatch):
    _, root, _ = run
    path = qsvd.export(root / "run", root / "kept" / "tiny.gguf", format="gguf")
    before = path.read_bytes()
    stale = path.with_name(f".tiny.gguf.file.{host_name()}-{2**22 + 1}.tmp")
    stale.write_bytes(b"left by a killed export")
    written = []

    def fail_on_the_third(data, qtype):
        written.append(qtype)
        if len(written) == 3:
            raise KeyboardInterrupt
        return quantize(data, qtype)

    quantize = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", fail_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        qsvd.export(root / "run", path, format="gguf", gguf_type="q8_0", overwrite=True)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [
        "tiny.Modelfile", "tiny.gguf", "tiny.md"]


@pytest.mark.parametrize("config, message", [
    (Phi3Config(), "GGUF export supports llama, mistral, qwen2 models; this one is 'phi3'"),
    (LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                                  "original_max_position_embeddings": 8192}),
     "GGUF export does not write 'yarn' rope scaling for llama yet"),
    (Qwen2Config(rope_parameters=LLAMA3_ROPE), "GGUF export does not write 'llama3' rope scaling for qwen2 yet"),
])
def test_an_architecture_gguf_export_does_not_write_is_refused_by_name(config, message):
    with pytest.raises(QSVDError, match=re.escape(message)):
        gguf_architecture(config)


def test_a_tokenizer_gguf_cannot_hold_is_refused_before_any_work(tiny_model_dir, tmp_path):
    qsvd.finetune(model=str(tiny_model_dir), method="lora", bits=16, rank=4, max_steps=1, seq_len=400, batch_size=2,
                  output=str(tmp_path / "run"))
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), "--format", "gguf"])
    assert result.exit_code == 2 and "a WordLevel tokenizer cannot be written to GGUF" in result.output
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


DAMAGES = {
    "truncated": (lambda text: text[: len(text) // 2], "tokenizer.json (a fast tokenizer)"),
    "empty": (lambda text: "", "is missing or unreadable"),
    "wordpiece": (lambda text: json.dumps(json.loads(text) | {"model": {"type": "WordPiece", "vocab": {}}}),
                  "a WordPiece tokenizer cannot be written to GGUF"),
    "unknown pre-tokenizer": (lambda text: json.dumps(json.loads(text) | {"pre_tokenizer": None}),
                              "llama.cpp knows no pre-tokenizer like this one"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_or_foreign_tokenizer_is_refused_by_name(damage, tmp_path):
    model, tokenizer = tiny("qwen2")
    tokenizer.save_pretrained(tmp_path)
    edit, message = DAMAGES[damage]
    (tmp_path / "tokenizer.json").write_text(edit((tmp_path / "tokenizer.json").read_text()))
    with pytest.raises(QSVDError, match=re.escape(message)):
        read_vocabulary(ModelFiles(tmp_path, ()), tokenizer, model.config.vocab_size)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    tokenizer = qwen2_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(QSVDError, match="has 303 tokens but the model's embedding only 100 rows"):
        read_vocabulary(ModelFiles(tmp_path, ()), tokenizer, 100)


def test_q8_0_keeps_rows_that_are_no_multiple_of_32_in_f16():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SIZES | {"hidden_size": 48, "num_attention_heads": 3,
                                                        "num_key_value_heads": 3}, vocab_size=64))
    types = {plan.gguf_name: plan.type.name for plan in plan_tensors(model, checkpoint_names(model), "llama", "q8_0")}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 48, 128
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output.weight"] == "F16"


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")  # as Meta-Llama-3's tokenizer.json has it


@pytest.mark.parametrize("pre_tokenizer, name", [
    (pre_tokenizers.ByteLevel(add_prefix_space=False), "gpt-2"),
    (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                              pre_tokenizers.ByteLevel(add_prefix_space=False)]), "smollm"),
    (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), "llama-bpe"),
])
def test_byte_level_pre_tokenizers_get_llama_cpps_names(pre_tokenizer, name):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    assert byte_level_pre_tokenizer(json.loads(tokenizer.to_str()), Path("tokenizer.json")) == name
