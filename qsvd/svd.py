"""Singular triplets for the splits, always computed in float32 or better."""

import torch


def _full_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD W = U diag(S) Vh in float32, with S descending.

    LAPACK is several times faster on a tall matrix than on a wide one, so a wide W
    is decomposed as Wᵀ = V S Uᵀ and the factors swapped back.
    """
    weight = weight.float()
    if weight.shape[0] >= weight.shape[1]:
        return torch.linalg.svd(weight, full_matrices=False)
    v, s, uh = torch.linalg.svd(weight.T, full_matrices=False)
    return uh.T, s, v.T


def top_triplets(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) for the r largest singular values."""
    u, s, vh = _full_svd(weight)
    return u[:, :rank], s[:rank], vh[:rank]


def bottom_triplets(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_min, S_min, Vh_min) for the r smallest singular values, exactly (full SVD)."""
    u, s, vh = _full_svd(weight)
    return u[:, -rank:], s[-rank:], vh[-rank:]
