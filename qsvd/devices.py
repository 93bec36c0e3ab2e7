"""Where qsvd computes, and in what dtype: one rule, which `qsvd plan` also applies to a GPU it is
not running on, by that GPU's compute capability."""

from collections.abc import Callable

import torch

from .errors import QSVDError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPUTE_DTYPES = ("auto", *DTYPES)  # --dtype's choices
NATIVE_BF16 = (8, 0)  # the compute capability from which a GPU has bf16 (Ampere)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device`, or the default one (the GPU if there is one) when it is None."""
    return torch.device(device) if device is not None else default_device()


def dtype_rule(requested: str, capability: tuple[int, int] | None, gpu: Callable[[], str] = str) -> str:
    """--dtype, or for auto: fp32 on a CPU (no `capability`); on a GPU bf16 from compute capability
    8.0, else fp16 (which Trainer trains with a loss scaler). bf16 asked for on a GPU without it is
    refused; `gpu()` names that GPU in the message."""
    native_bf16 = capability is None or capability >= NATIVE_BF16
    if requested == "bf16" and not native_bf16:
        raise QSVDError(f"--dtype bf16: {gpu()} has no bf16 and would emulate it slowly; use --dtype fp16 "
                        f"(auto's choice here) or fp32")
    if requested != "auto":
        return requested
    return "fp32" if capability is None else "bf16" if native_bf16 else "fp16"


def compute_dtype(device: torch.device, spec=None) -> torch.dtype:
    """The compute dtype on `device` for the layer spec's --dtype (auto without a spec)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None

    def gpu() -> str:
        return f"{torch.cuda.get_device_name(device)} (compute capability {'.'.join(map(str, capability))})"

    return DTYPES[dtype_rule(spec.dtype if spec is not None else "auto", capability, gpu)]
