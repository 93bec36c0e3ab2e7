"""Singular triplets for the splits, always computed in float32 or better.

- top r, exact: a full SVD on a CPU; on a GPU the eigendecomposition of the smaller Gram matrix
  in float32 (the top of the spectrum keeps fp32's accuracy there, for a fraction of an SVD's
  cost); or randomized (Halko et al., `torch.svd_lowrank`) with `niter` power iterations, for
  `--svd-niter`;
- bottom r, exact: the eigendecomposition of the smaller Gram matrix in float64. On this
  project's CPU it takes 12 s for a 4096 × 11008 matrix against 28 s for the fastest full
  SVD (and 129 s without the transpose trick), to the same accuracy in fp32. GPUs other than the
  data-centre ones (P100, V100, A100, H100, B200) run float64 at 1/32 to 1/64 of their fp32 rate,
  so there the bottom r come from a full SVD in float32, which keeps fp32's accuracy.
"""

import torch

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
OVERSAMPLE = 10  # extra random directions of the randomized SVD
SEED = 0  # the randomized SVD draws from its own generator, so a split is reproducible
FAST_FLOAT64_CAPABILITIES = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}  # float64 at 1/2 of the fp32 rate


def _full_svd(weight: torch.Tensor) -> Triplets:
    """Thin SVD W = U diag(S) Vh in float32, with S descending.

    LAPACK is several times faster on a tall matrix than on a wide one, so a wide W
    is decomposed as Wᵀ = V S Uᵀ and the factors swapped back.
    """
    weight = weight.float()
    if weight.shape[0] >= weight.shape[1]:
        return torch.linalg.svd(weight, full_matrices=False)
    v, s, uh = torch.linalg.svd(weight.T, full_matrices=False)
    return uh.T, s, v.T


def _randomized_svd(weight: torch.Tensor, rank: int, niter: int) -> Triplets:
    """The top `rank` triplets from a randomized range finder with `niter` power iterations."""
    q = min(rank + OVERSAMPLE, *weight.shape)
    devices = [weight.device] if weight.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED)
        u, s, v = torch.svd_lowrank(weight.float(), q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


def gram_triplets(weight: torch.Tensor, rank: int, largest: bool, dtype: torch.dtype) -> Triplets:
    """(U, S, Vh) for the r largest or smallest singular values, S descending, from the
    eigendecomposition of the smaller Gram matrix formed in `dtype` (in full fp32 on a GPU too:
    qsvd turns TF32 on only while training, `train.tf32_matmuls`).

    For W (out × in) with out ≥ in: WᵀW = V S² Vᵀ gives V and S, then U = W V / S (the other
    way round for a wide W). In float64, S_min keeps about 16 − 2·log10(S_max / S_min) digits:
    far more than fp32's 7 for any trained weight; in float32 only the top of the spectrum is exact.
    """
    w = weight.to(dtype)
    tall = w.shape[0] >= w.shape[1]
    gram = w.T @ w if tall else w @ w.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    chosen = slice(-rank, None) if largest else slice(None, rank)
    s = eigenvalues[chosen].clamp_min(0).sqrt().flip(0)
    right = eigenvectors[:, chosen].flip(1)  # V if tall, else U
    left = (w @ right if tall else w.T @ right) / s.clamp_min(torch.finfo(w.dtype).tiny)
    u, vh = (left, right.T) if tall else (right, left.T)
    return u.float(), s.float(), vh.float()


def fast_float64(device: torch.device) -> bool:
    """Whether float64 runs near the fp32 rate here: on a CPU, and on data-centre GPUs."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) in FAST_FLOAT64_CAPABILITIES


def top_triplets(weight: torch.Tensor, rank: int, niter: int | None = None) -> Triplets:
    """(U_r, S_r, Vh_r) for the r largest singular values: exact, or randomized if `niter` is set."""
    if niter is not None:
        return _randomized_svd(weight, rank, niter)
    if weight.device.type == "cuda":
        return gram_triplets(weight, rank, largest=True, dtype=torch.float32)
    u, s, vh = _full_svd(weight)
    return u[:, :rank], s[:rank], vh[:rank]


def bottom_triplets(weight: torch.Tensor, rank: int, niter: int | None = None) -> Triplets:
    """(U_min, S_min, Vh_min) for the r smallest singular values, S descending, exactly.

    `niter` is ignored: no randomized method finds the bottom of the spectrum.
    """
    if fast_float64(weight.device):
        return gram_triplets(weight, rank, largest=False, dtype=torch.float64)
    u, s, vh = _full_svd(weight)
    return u[:, -rank:], s[-rank:], vh[-rank:]
