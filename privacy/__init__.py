"""HE-LoRA research mode: a LoRA adapter's A and B encrypted with CKKS (TenSEAL) under the
tenant's key, each delta computed by the server on ciphertexts for its own plaintext activations
and decrypted by the tenant's key holder, which holds the secret key and no adapter weights.

- ``ckks``: the parameters and their justification, the contexts, the packing, both parties'
  operations; ``keyfiles``: a tenant's key directory
- ``adapter``: encrypting an adapter (mode ``he``), its file, the server's per-module delta
- ``keyholder``: the key holder over HTTP (Starlette); ``client``: the server's client (httpx)
- ``wire``: the one framing of ciphertext bundles
- ``attack``: what the server learns anyway from the deltas it is given

Imports nothing of ours but ``adapters``; the engine's side is ``engine.delta`` (a plain callable
hook), and the driver that joins the two is ``gateway.cli.he``.
"""
