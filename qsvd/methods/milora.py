"""MiLoRA (arXiv 2406.09044): the r *smallest* singular components train.

Exactly PiSSA's split on (U_min, Σ_min, V_min); the frozen base Q(W − s·B A) is the
principal matrix, which keeps what pretraining put in the large singular directions.
The bottom triplets are exact: the float64 eigendecomposition of the smaller Gram matrix.
"""

from .. import svd
from .pissa import PiSSALayer


class MiLoRALayer(PiSSALayer):
    name = "milora"
    default_lr = 3e-4
    summary = "bottom-r singular components train; the principal part is frozen (4-bit)."
    triplets = staticmethod(svd.bottom_triplets)
    refines = False  # the refinement re-takes the top triplets: it would undo the minor split
    uses_top_svd = False
