"""CKKS for HE-LoRA: the parameters, the two contexts, the packing, and both parties' operations.

A LoRA delta ``scale * (x @ A) @ B`` (A: ``d_in x r``, B: ``r x d_out``) is computed by a server
that holds A and B only as CKKS ciphertexts under the tenant's key, for activations x it computed
itself in plaintext; the tenant's key holder, which holds the secret key and no adapter weights,
decrypts. The server's context has no secret key (it cannot decrypt) and, the encryption being
symmetric, no public key either (it cannot encrypt): only the relinearisation keys.

Parameters (TenSEAL 0.3.18, Microsoft SEAL 4.1 underneath)
----------------------------------------------------------
- ``poly_modulus_degree`` N = 8192: 4096 slots per ciphertext, enough for a 576 x 8 A in two
  ciphertexts and a rank-8 B of a 576-wide output in two.
- ``coeff_mod_bit_sizes`` = [60, 40, 60], 160 bits in all. Each half of the computation has
  multiplicative depth 1 (one ct x pt product; one ct x ct product on a freshly encrypted
  operand), so one 40-bit prime is rescaled away and the result is decrypted at the 60-bit level:
  a value v survives as long as |v| * 2^40 < 2^59, i.e. |v| < 2^19, ample for partial products
  of activations and LoRA weights. The last 60-bit prime is SEAL's special prime for key
  switching (relinearisation); it must be at least as large as the data primes.
- scale 2^40: equal to the rescaled prime, so scales stay 2^40 after each rescale; measured
  error about 1e-8 absolute per slot after a product, far inside the 1e-3 (relative to the
  largest |delta|) this mode is held to.
- Security: the HomomorphicEncryption.org standard (Albrecht et al., 2018, Table 1, uniform
  ternary secret, classical 128-bit) allows log2(q) <= 218 for N = 8192; 160 is below it (N =
  4096 allows only 109, too little for a 40-bit scale with 19 bits of headroom plus a special
  prime). SEAL itself refuses moduli above its 128-bit table when it builds the context.
- Symmetric encryption, no Galois keys: only the key holder ever encrypts (the adapter, and
  the refreshed vector below), and the packing needs no rotations.

Packing (no rotations; cf. Halevi and Shoup's diagonal method, where a plaintext operand's
rotations are free, and the rotation-free column packing of MOAI, Zhang et al. 2025, for
ct x pt products)
-------------------------------------------------------------------------------------------
- A is laid out row-major over ``ceil(d_in / G)`` ciphertexts of ``G = slots // r`` rows each:
  slot ``g*r + j`` of ciphertext c holds ``A[c*G + g, j]``.
- Stage 1 (server, ct x pt): for a token x, ciphertext c is multiplied by the plaintext whose
  slot ``g*r + j`` is ``x[c*G + g]`` (each value of x repeated r times) and the products are
  added: slot ``g*r + j`` of the sum is ``x[c*G + g] * A[c*G + g, j]`` summed over c, so the G
  partial sums of each ``y_j = (x @ A)_j`` sit in G slots. Folding them in the ciphertext would
  take log2(G) rotations; the key holder adds them after decryption instead.
- Round trip 1 (key holder): decrypts, adds the partial sums (y, r numbers), and encrypts y
  repeated d_out times (slot ``j*d_out + k`` holds ``y_j``) in ``ceil(r * d_out / slots)``
  ciphertexts: the refresh also restores the level the product used.
- Stage 2 (server, ct x ct): multiplies those slot-wise with B laid out the same way (slot
  ``j*d_out + k`` holds ``B[j, k]``, the LoRA scale folded into B when it was encrypted) and
  relinearises.
- Round trip 2 (key holder): decrypts and adds over j: ``delta_k = sum_j y_j B[j, k]``, sent
  back in plaintext.

Per token and (layer, module) of SmolLM2's q_proj (576 -> 576) at rank 8: two ct x pt and two
ct x ct products, no rotation; the key holder decrypts three ciphertexts and encrypts two. The
one-round-trip alternative (rotate-and-sum the partial sums, mask, replicate y by rotations,
one more level) needs about 9 + 10 rotations and Galois keys (17.5 MB at these parameters) on
the server; ``loadtests.bench_he`` measures both the rotation and the round trip.

What each party sees (a server that follows the protocol): the server only ciphertexts and each
decrypted delta, never A, B or y. The delta next to the x it came from is the adapter's action
on x, though: least squares over enough tokens recovers ``scale * A @ B`` (``privacy.attack``).
The key holder sees the partial sums, y and the products ``y_j * B[j, k]``: functions of the
activations, which the tenant can compute from its own prompts and the public base model. It
decrypts whatever it is sent, so a server that deviates from the protocol could have it decrypt
the adapter's ciphertexts themselves; nothing here verifies what a ciphertext holds.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import tenseal as ts

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 60)
SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2
#: HomomorphicEncryption.org standard, Table 1 (ternary secret, classical): the largest
#: log2(q) per N for 128-bit security.
MAX_MODULUS_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_RANK = 256
MAX_WIDTH = 1 << 16

PARAMETERS = {
    "scheme": "ckks", "poly_modulus_degree": POLY_MODULUS_DEGREE,
    "coeff_mod_bit_sizes": list(COEFF_MOD_BIT_SIZES), "scale_bits": SCALE_BITS,
    "encryption": "symmetric", "security_bits": 128,
}


class CkksError(ValueError):
    """A ciphertext or a request that does not fit the packing."""


def _check_security() -> None:
    if sum(COEFF_MOD_BIT_SIZES) > MAX_MODULUS_BITS_128[POLY_MODULUS_DEGREE]:
        raise AssertionError("coefficient modulus above the 128-bit bound")


_check_security()


def new_secret_context() -> ts.Context:
    """A fresh key: the tenant's context, holding the secret key (and relinearisation keys)."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
                     encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=1)
    ctx.global_scale = 2.0**SCALE_BITS
    return ctx


def secret_context_bytes(ctx: ts.Context) -> bytes:
    """What the key holder keeps: parameters and the secret key."""
    if not ctx.is_private():
        raise CkksError("this context holds no secret key")
    return ctx.serialize(save_secret_key=True, save_relin_keys=False, save_galois_keys=False)


def server_context_bytes(ctx: ts.Context) -> bytes:
    """What the server gets: parameters and relinearisation keys; no secret, public or Galois key."""
    return ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)


def load_context(data: bytes) -> ts.Context:
    try:
        ctx = ts.context_from(data, n_threads=1)
    except Exception as exc:  # noqa: BLE001 - TenSEAL raises several kinds for bad bytes
        raise CkksError(f"not a TenSEAL context: {exc}") from None
    return ctx


def load_vector(ctx: ts.Context, data: bytes) -> ts.CKKSVector:
    try:
        return ts.ckks_vector_from(ctx, data)
    except Exception as exc:  # noqa: BLE001
        raise CkksError(f"not a ciphertext of this context: {type(exc).__name__}") from None


def chunk_sizes(total: int) -> list[int]:
    """How ``total`` slot values split over ciphertexts: full ones, then the rest."""
    full, rest = divmod(total, SLOTS)
    return [SLOTS] * full + ([rest] if rest else [])


@dataclasses.dataclass(frozen=True)
class Layout:
    """The packing of one (layer, module) of rank ``rank``, ``d_in`` -> ``d_out``."""

    d_in: int
    d_out: int
    rank: int

    def __post_init__(self) -> None:
        if not (1 <= self.rank <= MAX_RANK and 1 <= self.d_in <= MAX_WIDTH and 1 <= self.d_out <= MAX_WIDTH):
            raise CkksError(f"layout out of range: d_in {self.d_in}, d_out {self.d_out}, rank {self.rank}")

    @property
    def rows(self) -> int:
        """Rows of A per ciphertext."""
        return min(SLOTS // self.rank, self.d_in)

    @property
    def a_ciphertexts(self) -> int:
        return math.ceil(self.d_in / self.rows)

    @property
    def b_sizes(self) -> list[int]:
        return chunk_sizes(self.rank * self.d_out)

    def a_slots(self, a: np.ndarray) -> np.ndarray:
        """A ``[d_in, r]`` -> ``[a_ciphertexts, rows * r]`` (zero rows pad the last)."""
        padded = np.zeros((self.a_ciphertexts * self.rows, self.rank))
        padded[: self.d_in] = a
        return padded.reshape(self.a_ciphertexts, self.rows * self.rank)

    def x_slots(self, x: np.ndarray) -> np.ndarray:
        """x ``[d_in]`` -> the stage-1 plaintexts ``[a_ciphertexts, rows * r]``."""
        padded = np.zeros(self.a_ciphertexts * self.rows)
        padded[: self.d_in] = x
        return np.repeat(padded.reshape(self.a_ciphertexts, self.rows), self.rank, axis=1)

    def b_slots(self, b: np.ndarray) -> list[np.ndarray]:
        """B ``[r, d_out]`` j-major, split like ``b_sizes``."""
        return _split(np.asarray(b, dtype=np.float64).reshape(-1), self.b_sizes)


def _split(flat: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) > 1 else [flat]


# ---- the server's side ---------------------------------------------------------------------
def stage_one(layout: Layout, a: Sequence[ts.CKKSVector], x: np.ndarray) -> ts.CKKSVector:
    """The G partial sums of ``x @ A`` for one token: ct x pt products, added."""
    plain = layout.x_slots(x)
    acc = None
    for ct, p in zip(a, plain):
        prod = ct * p.tolist()
        acc = prod if acc is None else acc + prod
    assert acc is not None
    return acc


def stage_two(b: Sequence[ts.CKKSVector], y_repeated: Sequence[ts.CKKSVector]) -> list[ts.CKKSVector]:
    """``y_j * B[j, k]`` slot-wise (ct x ct, relinearised)."""
    if len(b) != len(y_repeated):
        raise CkksError(f"{len(y_repeated)} refreshed ciphertexts for {len(b)} of B")
    out = []
    for cb, cy in zip(b, y_repeated):
        if cb.size() != cy.size():
            raise CkksError(f"refreshed ciphertext of {cy.size()} slots against B's {cb.size()}")
        out.append(cy * cb)
    return out


# ---- the key holder's side -----------------------------------------------------------------
def _check_shape(rank: object, width: object) -> tuple[int, int]:
    for name, v, top in (("rank", rank, MAX_RANK), ("width", width, MAX_WIDTH)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise CkksError(f"{name} must be an integer in [1, {top}], got {v!r}")
    return rank, width  # type: ignore[return-value]


class KeyHolder:
    """The tenant's operations: it holds the secret key and no adapter weights, reduces and
    re-encrypts stage-1 results, and decrypts stage-2 results into deltas."""

    def __init__(self, ctx: ts.Context) -> None:
        if not ctx.is_private():
            raise CkksError("a key holder needs the secret key")
        self.ctx = ctx

    def _decrypt(self, blob: bytes) -> np.ndarray:
        return np.asarray(load_vector(self.ctx, blob).decrypt(), dtype=np.float64)

    def refresh(self, stage_ones: Sequence[bytes], rank: object, width: object) -> list[bytes]:
        """Per token: decrypt the partial sums, add them into y, encrypt y repeated ``width``
        times (``chunk_sizes(rank * width)`` ciphertexts per token, token-major)."""
        rank, width = _check_shape(rank, width)
        out = []
        for blob in stage_ones:
            partial = self._decrypt(blob)
            if partial.size == 0 or partial.size % rank:
                raise CkksError(f"a stage-1 vector of {partial.size} slots is not a multiple of rank {rank}")
            y = partial.reshape(-1, rank).sum(axis=0)
            for chunk in _split(np.repeat(y, width), chunk_sizes(rank * width)):
                out.append(ts.ckks_vector(self.ctx, chunk.tolist()).serialize())
        return out

    def decrypt(self, stage_twos: Sequence[bytes], rank: object, width: object) -> np.ndarray:
        """Stage-2 ciphertexts (token-major) -> the deltas ``[tokens, width]``."""
        rank, width = _check_shape(rank, width)
        sizes = chunk_sizes(rank * width)
        if not stage_twos or len(stage_twos) % len(sizes):
            raise CkksError(f"{len(stage_twos)} ciphertexts is not a multiple of the {len(sizes)} per token")
        deltas = []
        for t in range(0, len(stage_twos), len(sizes)):
            parts = [self._decrypt(b) for b in stage_twos[t : t + len(sizes)]]
            if [p.size for p in parts] != sizes:
                raise CkksError(f"stage-2 vectors of {[p.size for p in parts]} slots, expected {sizes}")
            deltas.append(np.concatenate(parts).reshape(rank, width).sum(axis=0))
        return np.stack(deltas)
