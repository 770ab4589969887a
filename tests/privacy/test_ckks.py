"""The CKKS parameters as chosen, the server's context that can neither decrypt nor encrypt, an
encrypted delta against the plaintext one, and the encrypted adapter file."""
from __future__ import annotations

import stat

import numpy as np
import pytest
import tenseal as ts

from adapters.validate import lora_tensor_name
from privacy import ckks
from privacy.adapter import EncryptedAdapter, HeLora, encrypt_adapter
from privacy.keyfiles import SECRET_FILE, SERVER_FILE, make_keys, read_context

from .conftest import lora


def test_parameters_are_the_chosen_ones_and_within_the_128_bit_bound(secret_ctx, server_ctx) -> None:
    assert ckks.POLY_MODULUS_DEGREE == 8192 and ckks.SLOTS == 4096
    assert ckks.COEFF_MOD_BIT_SIZES == (60, 40, 60) and ckks.SCALE_BITS == 40
    # HomomorphicEncryption.org standard, 128-bit classical, ternary secret: N = 8192 -> 218 bits
    assert sum(ckks.COEFF_MOD_BIT_SIZES) <= ckks.MAX_MODULUS_BITS_128[8192] == 218
    for ctx in (secret_ctx, server_ctx):
        assert ctx.global_scale == 2.0**40
        assert not ctx.has_galois_keys()  # the packing needs no rotations
    # what SEAL built: 160 bits with the special prime, 100 for data (60 + 40), 60 at the last level
    seal = server_ctx.seal_context().data
    assert seal.parameters_set()
    assert seal.key_context_data().parms().poly_modulus_degree() == 8192
    assert seal.key_context_data().total_coeff_modulus_bit_count() == 160
    assert seal.first_context_data().total_coeff_modulus_bit_count() == 100
    assert seal.last_context_data().total_coeff_modulus_bit_count() == 60
    # and SEAL enforces the same 128-bit table: 240 bits at N = 8192 is refused
    with pytest.raises(ValueError, match="not set correctly"):
        ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 60, 60, 60])


def test_server_context_holds_no_secret_key_and_cannot_decrypt_or_encrypt(secret_ctx, server_ctx) -> None:
    assert secret_ctx.is_private()
    assert not server_ctx.is_private() and server_ctx.is_public()
    assert not server_ctx.has_secret_key() and server_ctx.has_relin_keys()
    ct = ts.ckks_vector(secret_ctx, [1.5, -2.0, 3.25])
    theirs = ts.ckks_vector_from(server_ctx, ct.serialize())
    product = theirs * [2.0, 2.0, 2.0]  # it can compute on it...
    with pytest.raises(ValueError, match="secret"):
        product.decrypt()  # ...but not read it
    with pytest.raises(ValueError):
        ts.ckks_vector(server_ctx, [1.0])
    back = ts.ckks_vector_from(secret_ctx, product.serialize()).decrypt()
    assert np.allclose(back, [3.0, -4.0, 6.5], atol=1e-6)


def test_key_files(he_keys) -> None:
    assert stat.S_IMODE((he_keys / SECRET_FILE).stat().st_mode) == 0o600
    with pytest.raises(ckks.CkksError, match="never overwritten"):
        make_keys(he_keys)
    with pytest.raises(ckks.CkksError, match="holds no secret key"):
        read_context(he_keys / SERVER_FILE, private=True)
    with pytest.raises(ckks.CkksError, match="holds a secret key"):
        read_context(he_keys / SECRET_FILE, private=False)


@pytest.mark.parametrize("module", ["q_proj", "v_proj"])
def test_encrypted_delta_equals_the_plaintext_delta(module, secret_ctx, server_ctx, client) -> None:
    """Rank 8 on a 576-wide input, through the key holder over HTTP."""
    config, tensors = lora(8, (module,), [3], seed=11)
    adapter = EncryptedAdapter.load(server_ctx, encrypt_adapter(secret_ctx, config, tensors, {module: [3]}).serialize())
    x = np.random.default_rng(0).standard_normal((3, 576)) * 2.0
    a = tensors[lora_tensor_name(3, module, "A")].double().numpy()
    b = tensors[lora_tensor_name(3, module, "B")].double().numpy()
    want = config.scaling * (x @ a.T) @ b.T
    he = HeLora(adapter, client)
    got = he.delta(3, module, x)
    assert got.shape == want.shape
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-3, rel
    assert he.stats.round_trips == 2 and he.stats.tokens == 3
    # the adapter did the work: another adapter's delta is far off
    other_config, other = lora(8, (module,), [3], seed=12)
    wrong = EncryptedAdapter.load(server_ctx, encrypt_adapter(secret_ctx, other_config, other, {module: [3]}).serialize())
    assert np.abs(HeLora(wrong, client).delta(3, module, x) - want).max() / np.abs(want).max() > 0.5


def test_encrypted_adapter_file_round_trip_and_refusals(secret_ctx, server_ctx) -> None:
    config, tensors = lora(4, ("q_proj", "v_proj"), [0, 1], seed=3)
    enc = encrypt_adapter(secret_ctx, config, tensors, {"q_proj": [0, 1], "v_proj": [1]})
    loaded = EncryptedAdapter.load(server_ctx, enc.serialize())
    assert loaded.targets == {"q_proj": [0, 1], "v_proj": [1]}
    assert loaded.config == config
    m = loaded.modules[(1, "v_proj")]
    assert (m.layout.d_in, m.layout.d_out, len(m.a), len(m.b)) == (576, 192, 1, 1)
    with pytest.raises(ckks.CkksError, match="secret context"):
        encrypt_adapter(server_ctx, config, tensors, {"q_proj": [0]})
    with pytest.raises(ckks.CkksError, match="no layer 5"):
        encrypt_adapter(secret_ctx, config, tensors, {"q_proj": [5]})
    other = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    with pytest.raises(ckks.CkksError, match="not a ciphertext of this context"):
        EncryptedAdapter.load(other, enc.serialize())
