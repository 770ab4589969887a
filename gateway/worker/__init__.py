"""``tensafe worker``: the embedded engine behind the Backend protocol, served over HTTP, so a
gateway reaches engines in other processes or on other machines (``backends.remote``) as it
reaches the one in its own.

Modules: ``wire`` (the JSON shapes, imported by both ends; tokens: ``gateway.bearer``),
``stream`` (the NDJSON generation response), ``metrics`` (Prometheus, vLLM's names), ``app``
(the routes), ``server`` (the process).

Every endpoint but ``POST /v1/tokenize``
    ``{"prompt"} | {"messages"}, "add_special_tokens", "add_generation_prompt", "with_strings"``:
    200 ``{"tokens": [...], "token_strs": [...] | null}`` (the base model's tokenizer).
``POST /v1/detokenize``
    ``{"tokens": [...]}``: 200 ``{"prompt"}`` (special tokens kept).
``GET /health`` needs ``Authorization: Bearer <token>``, one of the
``worker_tokens``; without it: 401 ``{"error": {"kind": "unauthorized", ...}}``. Every answer to
an authenticated request carries ``x-tensafe-capacity``, the worker's capacity at the moment the
answer started (``{"free_sequence_slots", "free_adapter_slots", "queue_depth",
"max_sequence_slots", "max_adapter_slots", "epoch", "seq"}``; ``epoch`` names the worker
process, ``seq`` orders the stamps of one epoch), so a client's snapshot follows every call.

``POST /v1/generate``
    Body: ``{"request_id", "messages": [{"role", "content"}] | "prompt" | "prompt_token_ids",
    "sampling": {"max_tokens", "temperature", "top_p", "seed", "stop": [...], "ignore_eos",
    "min_tokens", "top_k", "repetition_penalty", "stop_token_ids": [...]}, "adapter_id",
    "cache_salt"}`` (exactly one of the three inputs; ``adapter_id`` null = the base model). The
    status is sent once the first chunk exists: 200 and ``application/x-ndjson``, one ``{"text",
    "prompt_tokens", "completion_tokens", "finish_reason"}`` per line, the last with a
    ``finish_reason``; the first is the engine's acceptance (no text, ``completion_tokens`` 0),
    sent as soon as the request is queued. A refusal is an error status
    with the error body below; an error after the first chunk is one last line
    ``{"error": {...}}``. A client that disconnects aborts the generation at once.
``POST /v1/abort``
    ``{"request_id"}``: abort it if it runs here; 200 ``{"request_id"}``.
``PUT /v1/adapters/{adapter_id}``
    Body: the adapter's tensors as safetensors (at most ``worker_max_adapter_bytes``, else 413),
    parsed in memory and never written anywhere; header ``x-tensafe-lora``: its shape as JSON,
    ``{"rank", "alpha", "target_modules": [...], "use_rslora"}``. 201 ``{"adapter_id",
    "adapters": [...]}``.
``DELETE /v1/adapters/{adapter_id}``
    200 ``{"adapters": [...]}`` (refused while a request, running or waiting, uses it).
``GET /v1/adapters``
    ``{"adapters": [...]}``: the ids loaded in the engine's slots.
``GET /v1/capacity``
    The capacity fields above plus ``"max_queue", "max_lora_rank", "max_model_len",
    "max_adapter_bytes", "adapters", "extensions"`` (the sampling extensions it honours).
``GET /v1/model-config``
    The served model's Hugging Face ``config.json`` (or ``null``).
``GET /health``
    200 ``{"ok": true, "model", "max_model_len", "detail"}`` while the engine runs, else 503 with
    ``"ok": false``.
``GET /metrics``
    Prometheus text: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
    ``vllm:kv_cache_usage_perc`` (the share of the KV cache's sequence slots in use; each slot
    holds a whole context) with a ``model_name`` label, and ``vllm:lora_requests_info`` (value:
    the scrape time; labels ``running_lora_adapters``, ``waiting_lora_adapters``: comma-separated
    ids, and ``max_lora``). A request counts as waiting until its first chunk.

Errors: ``{"error": {"kind", "message", "param", "adapter_id", "reason"}}``; ``kind`` names the
:mod:`gateway.backends.errors` class (``wire.KINDS``), ``reason`` is an adapter problem's kind
(``not_found``, ``slots_full``, ``rank_too_large``, ``in_use``, ``exists``, ``invalid``).
Statuses: 400 bad request or context too long, 401, 404 adapter not found, 409 other adapter
problems, 413 body too large, 501 unsupported, 503 overloaded or unavailable.
"""
