"""Stage 5, GGUF: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio.

The weights are the `merged` export's W' (every update merged into the original weights),
written as llama.cpp's converter (convert_hf_to_gguf.py) writes them: its tensor names, Llama's
q/k rows in llama.cpp's rotary order, 1-D tensors in f32 and the others in the chosen type
(q8_0: blocks of 32 weights with one f16 scale; q5_1, q5_0, q4_1, q4_0: blocks of 32 at 5 or 4 bits,
with an f16 scale and, for _1, an f16 minimum; a tensor whose rows are no multiple of 32 stays f16). The metadata holds the architecture's hyperparameters and the tokenizer: vocabulary, token
types, merges, special tokens and chat template, copied from the source GGUF where the model came
from one, else built from its tokenizer.json as llama.cpp's converter builds them.

The header is written from the shapes alone; then each tensor is merged, converted and written in
turn, so one tensor (and its converted copy) is in memory at a time.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from rich.progress import track
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .console import console
from .errors import QSVDError, first_line
from .load import ModelFiles

# --gguf-type → (the type of each 2-D tensor, the file's type), all written by the gguf package's own code
GGUF_TYPES = {name.lower(): (getattr(gguf.GGMLQuantizationType, name), getattr(gguf.LlamaFileType, f"MOSTLY_{name}"))
              for name in ("F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")}
# --gguf-type → llama.cpp's file type, for the k-quants that llama.cpp's own quantizer makes from an f16 file
LLAMA_CPP_TYPES = {"q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
EXPORT_TYPES = [*GGUF_TYPES, *LLAMA_CPP_TYPES]
# model_type → llama.cpp's architecture (its converter writes Mistral as llama)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
ROTARY_ORDER_ARCHITECTURES = {"llama"}  # q and k rows permuted to llama.cpp's rotary order
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
ROPE_TYPES = {"default", "linear"}
# tokenizer.json's pre-tokenizer → llama.cpp's name for it (tokenizer.ggml.pre)
BYTE_LEVEL_PRE_TOKENIZERS = {
    # Split(regex) then ByteLevel, by the regex (transformers' GGUF reader maps these names back)
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# Ollama's own templates for the chat formats it knows, found by the chat template's markers
OLLAMA_TEMPLATES = {
    "<|im_start|>": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n', ["<|im_start|>", "<|im_end|>"]),
    "<|start_header_id|>": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                            '{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
                            ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "[INST]": ('{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST]'
               '{{- else if eq .Role "assistant" }} {{ .Content }}</s>{{- end }}{{- end }}', ["[INST]", "[/INST]"]),
}


@dataclass
class Vocabulary:
    """The tokenizer as GGUF metadata: tokenizer.ggml.model and .pre, the tokens, their scores and types."""

    model: str
    pre: str | None
    tokens: list[str]
    scores: list[float] | None
    types: list[int]


def gguf_architecture(config: PretrainedConfig) -> str:
    """llama.cpp's name for the model's architecture; any other, or a rope scaling it does not take, is
    refused by name."""
    if config.model_type not in ARCHITECTURES:
        raise QSVDError(f"GGUF export supports {', '.join(ARCHITECTURES)} models; this one is {config.model_type!r}. "
                        f"Export it with --format merged and convert that with llama.cpp's convert_hf_to_gguf.py")
    architecture = ARCHITECTURES[config.model_type]
    rope_types = ROPE_TYPES | ({"llama3"} if architecture == "llama" else set())  # its rope_freqs: llama's only
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type not in rope_types:
        raise QSVDError(f"GGUF export does not write {rope_type!r} rope scaling for {config.model_type} yet (it "
                        f"writes {', '.join(sorted(rope_types))}); export with --format merged and convert it "
                        f"with llama.cpp's convert_hf_to_gguf.py")
    return architecture


def read_vocabulary(files: ModelFiles, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Vocabulary | None:
    """The vocabulary of the HF tokenizer in `files` (loaded: `tokenizer`) as llama.cpp's converter writes
    it (None for a GGUF source, whose tokenizer metadata is copied as it is). Byte-level BPE (GPT-2,
    Llama 3, Qwen2) becomes "gpt2" with the pre-tokenizer's name; sentencepiece-style BPE with byte
    fallback (Llama 2, Mistral) becomes "llama". Ids the tokenizer lacks up to the embedding's rows
    are [PADi], unused."""
    if files.gguf:
        return None
    path = files.config_dir / "tokenizer.json"
    try:
        tokenizer_json = json.loads(path.read_text())
        model = tokenizer_json["model"]
    except (OSError, ValueError, KeyError):
        raise QSVDError(f"GGUF export needs the model's tokenizer.json (a fast tokenizer); "
                        f"{path} is missing or unreadable") from None
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        try:
            vocab = gguf.vocab.LlamaHfVocab(files.config_dir)
        except (FileNotFoundError, TypeError, ValueError) as error:  # its ways of saying "not this kind"
            raise QSVDError(f"{path}: gguf reads no sentencepiece-style vocabulary from it "
                            f"({first_line(error)})") from None
        tokens, scores, types = zip(*((text.decode(), score, int(kind)) for text, score, kind in vocab.all_tokens()))
        return pad_vocabulary(Vocabulary("llama", None, list(tokens), list(scores), list(types)), vocab_size)
    if model.get("type") == "BPE" and (tokenizer_json.get("decoder") or {}).get("type") == "ByteLevel":
        added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
        tokens = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        if [i for _, i in tokens] != list(range(len(tokens))):
            raise QSVDError(f"{path}: the token ids are not 0..{len(tokens) - 1} without gaps; GGUF needs them so")
        types = [(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
                 if token in added else gguf.TokenType.NORMAL for token, _ in tokens]
        vocabulary = Vocabulary("gpt2", byte_level_pre_tokenizer(tokenizer_json, path),
                                [token for token, _ in tokens], None, [int(kind) for kind in types])
        return pad_vocabulary(vocabulary, vocab_size)
    raise QSVDError(f"{path}: a {model.get('type')} tokenizer cannot be written to GGUF; llama.cpp reads byte-level "
                    f"BPE (GPT-2, Llama 3, Qwen2) and sentencepiece-style BPE with byte fallback (Llama 2, Mistral)")


def byte_level_pre_tokenizer(tokenizer_json: dict, path: Path) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer; one it does not know is refused, since
    llama.cpp would then split text otherwise than the model was trained on."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        for name, known in BYTE_LEVEL_PRE_TOKENIZERS.items():
            if regex == known:
                return name
    raise QSVDError(f"{path}: llama.cpp knows no pre-tokenizer like this one ({json.dumps(pre)[:200]}); "
                    f"GGUF export writes those of GPT-2, Llama 3, Qwen2 and SmolLM")


def pad_vocabulary(vocabulary: Vocabulary, vocab_size: int) -> Vocabulary:
    count = len(vocabulary.tokens)
    if count > vocab_size:
        raise QSVDError(f"the tokenizer has {count} tokens but the model's embedding only {vocab_size} rows")
    padding = range(count, vocab_size)
    vocabulary.tokens += [f"[PAD{i}]" for i in padding]
    vocabulary.types += [int(gguf.TokenType.UNUSED)] * len(padding)
    if vocabulary.scores is not None:
        vocabulary.scores += [-1000.0] * len(padding)
    return vocabulary


def add_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig, name: str) -> None:
    """The architecture's hyperparameters under llama.cpp's keys, as its converter writes them."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def add_tokenizer(writer: gguf.GGUFWriter, files: ModelFiles, vocabulary: Vocabulary | None, vocab_size: int) -> None:
    """The tokenizer's metadata: a GGUF source's copied key by key, else the vocabulary and what
    gguf's SpecialVocab reads from the tokenizer files (merges, special ids, add_bos, chat template)."""
    if vocabulary is None:
        reader = gguf.GGUFReader(files.weights[0])
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                writer.add_key_value(key, field.contents(), field.types[0],
                                     sub_type=field.types[-1] if len(field.types) > 1 else None)
        return
    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre is not None:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    gguf.SpecialVocab(files.config_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


@dataclass
class TensorPlan:
    """One tensor of the file: the model's name for it, llama.cpp's, its shape and its type."""

    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    type: gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        block, block_bytes = gguf.GGML_QUANT_SIZES[self.type]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * self.shape[-1] // block * block_bytes


def tensor_name_map(architecture: str, blocks: int) -> gguf.TensorNameMap:
    """gguf's map from transformers' tensor names to llama.cpp's, for the architecture named so."""
    return gguf.get_tensor_name_map(next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items()
                                         if arch_name == architecture), blocks)


def plan_tensors(model: PreTrainedModel, names: list[str], architecture: str, gguf_type: str) -> list[TensorPlan]:
    """Each checkpoint tensor's GGUF name and type: 1-D ones f32, others the chosen type, or f16
    where its block (32 weights) would not fit a row."""
    name_map = tensor_name_map(architecture, model.config.num_hidden_layers)
    state = model.state_dict()
    plans = []
    for name in names:
        shape = tuple(state[name].shape)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise QSVDError(f"llama.cpp's {architecture} has no tensor for {name}")
        qtype = GGUF_TYPES[gguf_type][0] if len(shape) > 1 else gguf.GGMLQuantizationType.F32
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16
        plans.append(TensorPlan(name, gguf_name, shape, qtype))
    return plans


def rope_factors(config: PretrainedConfig) -> np.ndarray | None:
    """llama.cpp's rope_freqs for Llama 3.1's rope scaling ("llama3"): each default rotary frequency
    θ^(−2i/d) over the one the model was trained with (transformers' own computation of it)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") != "llama3":
        return None
    trained, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = 2 * trained.numel()
    default = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return (default / trained).float().numpy()


def rotary_order(value: torch.Tensor, name: str, config: PretrainedConfig) -> torch.Tensor:
    """llama.cpp's order of q's and k's rows (weight and bias): each head's two rotary halves interleaved."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = config.num_attention_heads
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = config.num_key_value_heads
    else:
        return value
    return value.reshape(heads, 2, value.shape[0] // heads // 2, *value.shape[1:]).swapaxes(1, 2).reshape(value.shape)


def write_gguf(path: Path, model: PreTrainedModel, architecture: str, vocabulary: Vocabulary | None,
               files: ModelFiles, names: list[str], read_merged, gguf_type: str, name: str) -> None:
    """The GGUF file at `path`: header and metadata first, then each tensor, read by `read_merged(name)`
    (fp32, merged), reordered, converted and written before the next is read."""
    config = model.config
    plans = plan_tensors(model, names, architecture, gguf_type)
    writer = gguf.GGUFWriter(path, architecture)
    add_hyperparameters(writer, config, name)
    writer.add_file_type(GGUF_TYPES[gguf_type][1])
    add_tokenizer(writer, files, vocabulary, config.vocab_size)
    factors = rope_factors(config)
    if factors is not None:  # first, as llama.cpp's converter writes its generated tensors
        writer.add_tensor_info(ROPE_FREQS, factors.shape, factors.dtype, factors.nbytes)
    for plan in plans:
        writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(np.float32), plan.nbytes, raw_dtype=plan.type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if factors is not None:
            writer.write_tensor_data(factors)
        for plan in track(plans, description=f"merge → {gguf_type}", console=console):
            value = read_merged(plan.hf_name).float()
            if architecture in ROTARY_ORDER_ARCHITECTURES:
                value = rotary_order(value, plan.hf_name, config)
            writer.write_tensor_data(gguf.quants.quantize(value.numpy(), plan.type))
    finally:
        writer.close()


def llama_cpp(purpose: str):
    """llama-cpp-python, or one line saying how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise QSVDError(f"{purpose} needs llama-cpp-python: pip install 'qsvd[llama-cpp]' (it compiles llama.cpp: "
                        f"about 10 minutes on 2 CPU cores)") from None
    return llama_cpp


def llama_quantize(source: Path, target: Path, gguf_type: str) -> None:
    """llama.cpp's own quantizer (llama-quantize's code): the f16 GGUF `source` as `gguf_type` in `target`."""
    import ctypes

    library = llama_cpp(f"--gguf-type {gguf_type}")
    params = library.llama_model_quantize_default_params()
    params.ftype = getattr(library, LLAMA_CPP_TYPES[gguf_type])
    console.print(f"quantizing to {gguf_type} with llama.cpp ...")
    if library.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise QSVDError(f"llama.cpp could not quantize the model to {gguf_type} (its log above says why)")


def chat_format(chat_template: str | None) -> str | None:
    """The marker of the Ollama template that the chat template follows, if any."""
    return next((marker for marker in OLLAMA_TEMPLATES if chat_template and marker in chat_template), None)


def modelfile(gguf_file: Path, title: str, chat_template: str | None, eos_token: str | None) -> str:
    """An Ollama Modelfile: what the file is (`title`), FROM the file beside it, the chat format as
    a TEMPLATE, its stop tokens."""
    lines = [f"# {title}", f"FROM ./{gguf_file.name}"]
    marker = chat_format(chat_template)
    stops = [eos_token] if eos_token else []
    if marker is not None:
        template, format_stops = OLLAMA_TEMPLATES[marker]
        lines.append(f'TEMPLATE """{template}"""')
        stops = format_stops + [stop for stop in stops if stop not in format_stops]
    else:
        lines.insert(1, "# No TEMPLATE: the chat template is none Ollama's templates follow; Ollama reads the "
                        "one in the GGUF's metadata")
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"
