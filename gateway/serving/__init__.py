"""The request path behind the OpenAI endpoints: what a model name means, how a request is
admitted and started on a backend, and how its reply streams back.

- ``names``        model names to targets (the base model, a tenant's adapter, a local one)
- ``auto``         ``model: "auto"``: the tenant's expert table picks the adapter
- ``completions``  resolve, admit, start, answer (JSON or SSE)
- ``streaming``    the request guard (disconnects, deadlines) and the SSE response
- ``slots``        a backend's adapter slots as the cache sees them
"""
