"""A transformers model written as a GGUF file the way llama.cpp's converter writes it (its tensor
names, metadata, Llama's q/k permutation, Gemma's norms stored as 1 + w), with a byte-level BPE
vocabulary of one token a character: so that tests can read GGUF models of many architectures."""

from pathlib import Path

import gguf
import numpy as np
from transformers import PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from conftest import SPECIALS, char_tokenizer


def byte_level_vocabulary(size: int) -> tuple[list[str], list[int]]:
    """The char tokenizer's tokens spelled in GPT-2's byte alphabet, padded to `size`, and their types."""
    spelling = bytes_to_unicode()
    tokens = [token if token in SPECIALS else "".join(spelling[b] for b in token.encode())
              for token, _ in sorted(char_tokenizer().get_vocab().items(), key=lambda item: item[1])]
    types = [gguf.TokenType.CONTROL if token in SPECIALS else gguf.TokenType.NORMAL for token in tokens]
    padding = [f"<unused{i}>" for i in range(size - len(tokens))]
    return tokens + padding, types + [gguf.TokenType.UNUSED] * len(padding)


def llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's order of the rotary halves in q and k (transformers' GGUF loader undoes it)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def write_gguf(model: PreTrainedModel, path: Path, architecture: str | None = None) -> Path:
    """`model` as a GGUF file of `architecture` (default: its model_type), in float32."""
    config = model.config
    architecture = architecture or config.model_type
    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(f"tiny {architecture}")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if architecture == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    tokens, types = byte_level_vocabulary(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))  # no merges: every token one character
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_add_bos_token(True)  # as the char tokenizer does
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_unk_token_id(SPECIALS.index("<unk>"))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # stored once, as the embedding
        base, suffix = name.rsplit(".", 1)
        data = tensor.float().numpy()
        if architecture == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            data = llama_permute(data, heads)
        if architecture == "gemma2" and "norm" in base:
            data = data + 1
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
