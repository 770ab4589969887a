"""Who may do what, and what they own: credentials, quotas, usage, packages and the tenant
operations that change them.

- ``auth`` (API keys, stored as keyed hashes), ``oidc`` (bearer JWTs), ``keyprovider`` (the
  gateway's own secrets), ``remembered`` (registry reads kept briefly on the request path)
- ``service``   tenant, key, signing-key and adapter operations, checked and audited
- ``quotas``    per-tenant token buckets, in-process or in Redis; ``usage`` per-day counters
- ``blobs``     uploaded packages on disk; ``packages`` the disk tier's lookup of them
- ``bootstrap`` the operator key, a fixed tenant key, the development demo tenant
"""
