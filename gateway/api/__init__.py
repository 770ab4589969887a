"""The HTTP edge: handlers, bodies, views, middleware, metrics and the route table.

- ``routes``      the route table (each path to an API object's handler)
- ``openai``      the OpenAI endpoints; ``operations`` health, readiness, metrics
- ``tenant``, ``admin``   the tenant self-service and operator APIs
- ``callers``     who is calling (any credential, a tenant, an operator)
- ``bodies``      bounded request bodies and JSON checked at the edge; ``views`` record views
- ``exceptions``  every error to OpenAI's shape, once; ``jsonresponse`` replies that cannot fail
- ``middleware``  request ids, the access log, the last-resort 500; ``metrics`` Prometheus
"""
