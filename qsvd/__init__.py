"""qsvd: SVD-initialised adapters (MiLoRA, EDoRA, LoRA-SB and baselines) on a 4-bit frozen base."""

from . import notices  # noqa: F401  (first: it quiets bitsandbytes before its import)
from .chat import chat
from .config import FinetuneConfig
from .errors import QSVDError
from .evaluate import evaluate
from .export import export
from .finetune import finetune, init
from .methods import METHODS
from .plan import plan
from .run_dir import load_run
from .split import prepare
from .version import __version__

__all__ = ["FinetuneConfig", "METHODS", "QSVDError", "chat", "evaluate", "export", "finetune", "init", "load_run", "plan", "prepare", "__version__"]
