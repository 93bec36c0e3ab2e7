"""A transformers model written as a GGUF file the way llama.cpp's converter writes it (its tensor
names, metadata, Llama's q/k permutation, Gemma's norms stored as 1 + w), with a byte-level BPE
vocabulary of one token a character: so that tests can read GGUF models of many architectures."""

from pathlib import Path

import gguf
from transformers import PreTrainedModel
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qsvd.export_gguf import add_hyperparameters, rotary_order, tensor_name_map

from conftest import SPECIALS, char_tokenizer


def byte_level_vocabulary(size: int) -> tuple[list[str], list[int]]:
    """The char tokenizer's tokens spelled in GPT-2's byte alphabet, padded to `size`, and their types."""
    spelling = bytes_to_unicode()
    tokens = [token if token in SPECIALS else "".join(spelling[b] for b in token.encode())
              for token, _ in sorted(char_tokenizer().get_vocab().items(), key=lambda item: item[1])]
    types = [gguf.TokenType.CONTROL if token in SPECIALS else gguf.TokenType.NORMAL for token in tokens]
    padding = [f"<unused{i}>" for i in range(size - len(tokens))]
    return tokens + padding, types + [gguf.TokenType.UNUSED] * len(padding)


def write_gguf(model: PreTrainedModel, path: Path, architecture: str | None = None) -> Path:
    """`model` as a GGUF file of `architecture` (default: its model_type), in float32."""
    config = model.config
    architecture = architecture or config.model_type
    names = tensor_name_map(architecture, config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, architecture)
    add_hyperparameters(writer, config, f"tiny {architecture}")
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
        data = tensor.float()
        if architecture == "llama":
            data = rotary_order(data, name, config)
        data = data.numpy()
        if architecture == "gemma2" and "norm" in base:
            data = data + 1
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
