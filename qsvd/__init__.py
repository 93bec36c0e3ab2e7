"""qsvd: SVD-initialised adapters (MiLoRA, EDoRA, LoRA-SB and baselines) on a 4-bit frozen base."""

__version__ = "0.1.0"

import logging  # noqa: E402

# bitsandbytes warns on import, on every CPU without its optional `kernels` package, that it could not
# load that package's 4-bit CPU kernel; it falls back to its own, and nothing is for the user to do.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
logging.getLogger(BNB_CPU_LOGGER).setLevel(logging.ERROR)

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
