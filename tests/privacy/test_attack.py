"""The server's attack on what HE-LoRA shows it: from real activations of the model (its own)
and the deltas the key holder decrypts for it, least squares recovers the adapter's product
``scale * A @ B`` within 1% (Frobenius) without decrypting a weight, once the tokens span the
module's input space (d_in = 576 here; the bench measures the same on q_proj at rank 8)."""
from __future__ import annotations

from pydoc_data.topics import topics

import pytest

from adapters.validate import lora_tensor_name
from gateway.cli.he import capture_activations
from privacy import attack
from privacy.adapter import EncryptedAdapter, HeLora, encrypt_adapter
from privacy.ckks import KeyHolder

from .conftest import lora

pytestmark = pytest.mark.slow

LAYER, MODULE, RANK = 1, "v_proj", 4
D_IN = 576
TOKENS = 640


@pytest.fixture(scope="module")
def observed(generator, secret_ctx, server_ctx):
    """What the server holds after TOKENS tokens: its activations, the decrypted deltas; and,
    to score the attack, the true product."""
    ids = generator.tokenizer.tokenize(prompt="\n\n".join(topics[k] for k in sorted(topics)[:20]))
    assert len(ids) >= TOKENS
    x = capture_activations(generator, ids[:TOKENS], LAYER, MODULE, chunk=120)
    config, tensors = lora(RANK, (MODULE,), [LAYER], seed=21)
    adapter = EncryptedAdapter.load(server_ctx, encrypt_adapter(secret_ctx, config, tensors,
                                                                {MODULE: [LAYER]}).serialize())
    # the key holder's own code, in-process (the HTTP path is tested elsewhere; same deltas)
    deltas = HeLora(adapter, KeyHolder(secret_ctx)).delta(LAYER, MODULE, x)
    a = tensors[lora_tensor_name(LAYER, MODULE, "A")].double().numpy()
    b = tensors[lora_tensor_name(LAYER, MODULE, "B")].double().numpy()
    return x, deltas, config.scaling * a.T @ b.T


def test_least_squares_recovers_the_product_once_tokens_span_the_input(observed) -> None:
    x, deltas, w = observed
    assert x.shape == (TOKENS, D_IN)
    error_at = lambda n: attack.relative_error(attack.least_squares(x[:n], deltas[:n]), w)  # noqa: E731
    needed = attack.tokens_to(error_at, RANK, TOKENS)
    print(f"least squares: within 1% after {needed} tokens (d_in {D_IN}); {error_at(TOKENS):.1e} after {TOKENS}")
    assert needed is not None and D_IN <= needed <= TOKENS
    assert error_at(TOKENS) <= 0.01
    # below d_in the part of A outside the activations' span stays hidden, rank constraint or not
    assert error_at(D_IN * 3 // 4) > 0.3
    assert attack.relative_error(attack.least_squares(x[:500], deltas[:500], RANK), w) > 0.3
    assert attack.relative_error(attack.least_squares(x[:TOKENS], deltas[:TOKENS], RANK), w) <= 0.01


def test_the_adapters_output_directions_leak_from_a_handful_of_tokens(observed) -> None:
    x, deltas, w = observed
    assert attack.output_subspace_error(deltas[: 2 * RANK], w, RANK) <= 1e-3
    held_out = x[TOKENS // 2 :]
    partial = attack.least_squares(x[: TOKENS // 2], deltas[: TOKENS // 2])
    # half the tokens: the product is far off, yet on real inputs it already acts much like it
    assert attack.relative_error(partial, w) > 0.3
    assert attack.effect_error(partial, w, held_out) < attack.relative_error(partial, w)
