"""``tensafe agent``: the only writer of one vLLM server's adapters. vLLM takes an adapter only
as a path and rereads it whenever the adapter has left its CPU cache, so the agent, beside the
server (a sidecar sharing a memory-backed ``emptyDir``), keeps each adapter's files for exactly
as long as vLLM has it registered. It refuses a directory that is not tmpfs or ramfs, and it
imports no torch.

Modules: ``memfs`` (is a directory memory-backed), ``vllm`` (the calls to vLLM),
``holdings`` (files, registrations, leases, eviction, reconciliation), ``app`` (the routes),
``server`` (the process).

Every endpoint but ``GET /health`` needs ``Authorization: Bearer <token>``, one of
``agent_tokens`` (two at once while rotating); without it: 401. Serve it over TLS or behind a
NetworkPolicy that admits only the gateways: its bodies are decrypted adapters.

``PUT /v1/adapters/{adapter_id}?holder=H&ttl_s=T``
    Body: the adapter's tensors as safetensors (at most ``agent_max_bytes``); header
    ``x-tensafe-peft-config``: its ``adapter_config.json`` (a PEFT LoRA config). Ensures the
    adapter is registered in vLLM under ``adapter_id`` (the gateway's internal id, never a
    tenant's name) and leases it to holder ``H`` for ``T`` seconds (at most
    ``agent_max_lease_s``; 0: no lease). Room is made by unloading least recently used unleased
    adapters. 201 when written, 200 when it was held already; 409 ``slots_full`` when every
    adapter is leased.
``POST /v1/leases``
    ``{"holder", "ttl_s", "adapters": [...]}``: renew (``ttl_s`` 0: release) the holder's leases;
    ``{"renewed": [...], "missing": [...]}`` (missing: not held here, send it again).
``DELETE /v1/adapters/{adapter_id}?holder=H``
    Unregister it from vLLM, then delete its files; 409 ``in_use`` while another holder's lease
    runs, 404 when not held.
``GET /v1/adapters``
    Every answer above ends with the holdings: ``{"adapters": [{"adapter_id", "bytes",
    "leases"}], "max_adapters", "max_bytes", "bytes"}``.
``GET /health``
    200 ``{"ok": true, "vllm": true, "reconciled": true}`` once vLLM answers and the holdings
    agree with it, else 503.

Errors: the worker's shape, ``{"error": {"kind", "message", "param", "adapter_id", "reason"}}``.
"""
