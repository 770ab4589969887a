"""What a server running HE-LoRA learns anyway: the adapter's product, by least squares.

The server computes the activations x of a target module itself and is handed each decrypted
delta ``x @ W``, ``W = scale * A @ B`` (``d_in x d_out``, rank r). Over n tokens that is
``D = X @ W`` with X and D known, and no ciphertext of A or B is ever decrypted:

- Plain least squares, ``W_hat = pinv(X) @ D``: with exact deltas it is ``P @ W``, P the
  projection onto the span of the tokens' activations, so the error ``|(I - P) W| / |W|``
  (Frobenius) falls as the tokens span more of the input space and vanishes once they span all
  of it: about d_in tokens for isotropic inputs, more when real activations are anisotropic
  (weak directions need more tokens to be conditioned well).
- Rank-constrained (the best rank-r approximation of ``W_hat``): counting degrees of freedom,
  r (d_in + d_out - r) unknowns against d_out equations per token, suggests far fewer tokens,
  but ``(A + Z) @ B`` with ``X @ Z = 0`` fits the same deltas at the same rank: no estimator
  can place the part of A outside the observed activations' span. What the rank buys is B's row
  space (the directions the adapter writes into), exact from r tokens (``output_subspace_error``).
- On held-out activations, ``|X' (W_hat - W)| / |X' W|`` is what the recovered product gets
  wrong about the adapter's action on real inputs, the practical measure of the leak.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def least_squares(x: np.ndarray, delta: np.ndarray, rank: int | None = None) -> np.ndarray:
    """The product ``W [d_in, d_out]`` that best explains ``delta ~ x @ W`` (minimum norm), or
    its best rank-``rank`` approximation."""
    w, *_ = np.linalg.lstsq(np.asarray(x, dtype=np.float64), np.asarray(delta, dtype=np.float64), rcond=None)
    if rank is not None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        w = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return w


def relative_error(w_hat: np.ndarray, w: np.ndarray) -> float:
    """Frobenius ``|w_hat - w| / |w|``."""
    return float(np.linalg.norm(w_hat - w) / np.linalg.norm(w))


def effect_error(w_hat: np.ndarray, w: np.ndarray, x_test: np.ndarray) -> float:
    """``|X' (w_hat - w)| / |X' w|`` on held-out activations X'."""
    return float(np.linalg.norm(x_test @ (w_hat - w)) / np.linalg.norm(x_test @ w))


def output_subspace_error(delta: np.ndarray, w: np.ndarray, rank: int) -> float:
    """Sine of the largest principal angle between the top-``rank`` right singular subspace of
    the observed deltas and W's row space (0: the adapter's output directions are known)."""
    _, _, vt_d = np.linalg.svd(np.asarray(delta, dtype=np.float64), full_matrices=False)
    _, _, vt_w = np.linalg.svd(w, full_matrices=False)
    cosines = np.linalg.svd(vt_d[:rank] @ vt_w[:rank].T, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - float(cosines.min()) ** 2)))


def tokens_to(error_at: Callable[[int], float], lo: int, hi: int, target: float = 0.01) -> int | None:
    """The smallest n in [lo, hi] with ``error_at(n) <= target``, for an error that does not
    grow with n (more tokens, more span): doubling from lo, then bisection. None if even hi
    tokens miss the target."""
    if error_at(hi) > target:
        return None
    good, bad = hi, lo - 1
    n = lo
    while n < hi:
        if error_at(n) <= target:
            good = n
            break
        bad = n
        n *= 2
    while good - bad > 1:
        mid = (good + bad) // 2
        if error_at(mid) <= target:
            good = mid
        else:
            bad = mid
    return good
