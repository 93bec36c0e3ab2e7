"""Stage 3: frozen storage Q(·) of a layer's base weight.

- bits 4: bitsandbytes NF4 with double quantization (`Linear4bit`);
- bits 8: bitsandbytes int8 (`Linear8bitLt`) with LLM.int8's outlier threshold, transformers'
  default: on a GPU, input columns with a value above it multiply deq(Q(W)) in fp16 instead of
  being rounded to int8 with the rest (training on a CPU multiplies deq(Q(W)) in the compute dtype);
- bits 16: a plain frozen `nn.Linear` in the compute dtype.

On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place on its first forward pass
in eval mode, for a kernel of its own whose results differ from the training path's (by up to
3e-3 in a tiny test model's logits). qsvd turns that off, so that a model gives the same outputs in
training and evaluation on every CPU, and its stored weight stays the one it was quantized to.
"""

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from torch import nn

SUPPORTED_BITS = (4, 8, 16)
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold, as transformers' BitsAndBytesConfig sets it


def freeze(weight: torch.Tensor, bias: torch.Tensor | None, bits: int, dtype: torch.dtype,
           device: torch.device | str) -> nn.Module:
    """A frozen linear layer holding Q(weight), placed on `device`."""
    out_features, in_features = weight.shape
    has_bias = bias is not None
    if bits == 4:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=has_bias, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False,
                                         quant_type="nf4", compress_statistics=True)
    elif bits == 8:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        # Int8Params quantizes only on a move from the CPU.
        layer.weight = bnb.nn.Int8Params(weight.to(dtype).cpu(), requires_grad=False,
                                         has_fp16_weights=False)
    elif bits == 16:
        layer = nn.Linear(in_features, out_features, bias=has_bias, device="meta")
        layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    else:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if has_bias:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return same_path_in_eval(layer.to(device))  # moving a bnb layer to its device is what quantizes it


def same_path_in_eval(layer: nn.Module) -> nn.Module:
    """Keep bitsandbytes from repacking a 4-bit layer for its CPU eval kernel (see above)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        layer.support_avx512bf16_for_cpu = False
    return layer


def load_frozen(state: dict[str, torch.Tensor], bits: int, dtype: torch.dtype,
                device: torch.device | str) -> nn.Module:
    """The frozen layer `freeze` made, rebuilt from its `state_dict()` without quantizing again."""
    bias = state.get("bias")
    if bits == 4:
        stats = {key.removeprefix("weight."): t for key, t in state.items() if key.startswith("weight.")}
        weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, requires_grad=False, device=device)
        out_features, in_features = weight.quant_state.shape
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
    elif bits == 8:
        weight = bnb.nn.Int8Params(state["weight"], requires_grad=False, has_fp16_weights=False,
                                   SCB=state["SCB"]).to(device)
        layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=bias is not None,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
    elif bits == 16:
        weight = nn.Parameter(state["weight"].to(device, dtype), requires_grad=False)
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    layer.weight = weight
    if bias is not None:
        layer.bias = nn.Parameter(bias.to(device, dtype), requires_grad=False)
    return same_path_in_eval(layer)


def dequantize(layer: nn.Module) -> torch.Tensor:
    """deq(Q(W)) in float32: the weight the frozen layer actually multiplies by."""
    weight = layer.weight
    if isinstance(weight, bnb.nn.Params4bit):
        return bnbF.dequantize_4bit(weight.data, weight.quant_state).float()
    if isinstance(weight, bnb.nn.Int8Params):
        scales = weight.SCB if weight.SCB is not None else layer.state.SCB
        return bnbF.int8_vectorwise_dequant(weight.data, scales).float()
    return weight.detach().float()


def roundtrip(weight: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """deq(Q(weight)) in float32, on the weight's device."""
    return dequantize(freeze(weight, None, bits, dtype, weight.device))
