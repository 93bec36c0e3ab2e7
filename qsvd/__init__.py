"""qsvd: SVD-initialised adapters (MiLoRA, EDoRA, LoRA-SB and baselines) on a 4-bit frozen base."""

__version__ = "0.1.0"

import logging  # noqa: E402
import warnings  # noqa: E402

# Notices of bitsandbytes on a CPU that nobody can act on, kept out of qsvd's output: on import, that
# its optional `kernels` package is missing or cannot fetch its hub kernel (it falls back to its own
# 4-bit kernel), and, offline, `kernels`' own note that it skips the hub's publisher check; on the first
# step, that paged optimizers page nothing on a CPU (they fall back to the same optimizer, unpaged).
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
logging.getLogger(BNB_CPU_LOGGER).setLevel(logging.ERROR)
logging.getLogger(KERNELS_HUB_LOGGER).setLevel(logging.ERROR)
# On a GPU at 8 bits, LLM.int8 multiplies in fp16 by design and bitsandbytes says so on every forward
# whose input is bf16 or fp32 ("MatMul8bitLt: inputs will be cast from … to float16").
BNB_MATMUL_LOGGER = "bitsandbytes.autograd._functions"
logging.getLogger(BNB_MATMUL_LOGGER).addFilter(lambda record: "inputs will be cast" not in record.getMessage())
warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU", category=UserWarning)

from .config import FinetuneConfig  # noqa: E402
from .errors import QSVDError  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .export import export  # noqa: E402
from .finetune import finetune, init  # noqa: E402
from .methods import METHODS  # noqa: E402
from .plan import plan  # noqa: E402
from .run import load_run  # noqa: E402
from .split import prepare  # noqa: E402

__all__ = ["FinetuneConfig", "METHODS", "QSVDError", "evaluate", "export", "finetune", "init", "load_run", "plan", "prepare", "__version__"]
