"""The registry: method name → its `AdapterLayer` class; and the layer spec, checked against it."""

from ..devices import COMPUTE_DTYPES
from ..errors import QSVDError
from ..quantize import SUPPORTED_BITS
from .base import CORE_INITS, INIT_SAMPLES, AdapterLayer, AdapterSpec
from .dora import DoRALayer
from .edora import EDoRALayer
from .lora import LoRALayer
from .loraxs import LoRAXSLayer
from .lorasb import LoRASBLayer
from .milora import MiLoRALayer
from .pissa import PiSSALayer

METHODS: dict[str, type[AdapterLayer]] = {
    cls.name: cls
    for cls in (LoRALayer, DoRALayer, PiSSALayer, MiLoRALayer, LoRAXSLayer, EDoRALayer, LoRASBLayer)
}


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QSVDError(f"--bits {bits} is not supported; choose one of: {', '.join(map(str, SUPPORTED_BITS))}")


def methods_that(has: str) -> str:
    """The names of the methods whose class attribute `has` is true, for a message."""
    return ", ".join(name for name, cls in METHODS.items() if getattr(cls, has))


def make_spec(method: str, rank: int, alpha: float | None = None, bits: int = 4, **options) -> AdapterSpec:
    """The layer spec, with alpha defaulting to the rank (s = 1); a method without alpha has s = 1."""
    if method not in METHODS:
        raise QSVDError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    check_bits(bits)
    if rank <= 0:
        raise QSVDError(f"--rank must be a positive integer, got {rank}")
    if alpha is not None and alpha <= 0:
        raise QSVDError(f"--alpha must be positive, got {alpha}")
    layer_cls = METHODS[method]
    if not layer_cls.uses_alpha:
        if alpha is not None and alpha != rank:
            raise QSVDError(f"{method} fixes the scale s = 1 and takes no --alpha; drop the flag")
        alpha = None
    if not 0 <= options.get("dropout", 0.0) < 1:
        raise QSVDError(f"dropout must be in [0, 1), got {options['dropout']}")
    if options.get("core_init", CORE_INITS[0]) not in CORE_INITS:
        raise QSVDError(f"core_init must be {' or '.join(map(repr, CORE_INITS))}, got {options['core_init']!r}")
    refine_iters = options.get("refine_iters", 0)
    if refine_iters < 0 or (refine_iters and not layer_cls.refines):
        raise QSVDError(f"--refine-iters takes a count ≥ 0 and applies to {methods_that('refines')} only")
    if options.get("dtype", "auto") not in COMPUTE_DTYPES:
        raise QSVDError(f"--dtype must be one of {', '.join(COMPUTE_DTYPES)}; got {options['dtype']!r}")
    svd_niter = options.get("svd_niter")
    if svd_niter is not None and (svd_niter < 0 or not layer_cls.uses_top_svd):
        raise QSVDError(f"--svd-niter takes a count ≥ 0 and applies to the methods with a top-r SVD "
                        f"({methods_that('uses_top_svd')}), not {method}")
    return AdapterSpec(method=method, rank=rank, alpha=float(alpha or rank), bits=bits, **options)


__all__ = ["INIT_SAMPLES", "METHODS", "AdapterLayer", "AdapterSpec", "make_spec"]
