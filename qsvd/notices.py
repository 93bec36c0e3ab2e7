"""Library notices that nobody can act on, kept out of qsvd's output: set before bitsandbytes is
first imported (`qsvd/__init__.py` imports this module first), as it logs some on import."""

import logging
import warnings

# bitsandbytes on a CPU: on import, that its optional `kernels` package is missing or cannot fetch its
# hub kernel (it falls back to its own 4-bit kernel), and, offline, `kernels`' own note that it skips
# the hub's publisher check; on the first step, that paged optimizers page nothing on a CPU (they fall
# back to the same optimizer, unpaged).
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
logging.getLogger(BNB_CPU_LOGGER).setLevel(logging.ERROR)
logging.getLogger(KERNELS_HUB_LOGGER).setLevel(logging.ERROR)
# On a GPU at 8 bits, LLM.int8 multiplies in fp16 by design and bitsandbytes says so on every forward
# whose input is bf16 or fp32 ("MatMul8bitLt: inputs will be cast from … to float16").
BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"
logging.getLogger(BNB_MATMUL_LOGGER).addFilter(lambda record: "inputs will be cast" not in record.getMessage())
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)
