"""Property test: no request body, however malformed, gets a 5xx or a non-OpenAI error shape."""
from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from gateway.app import create_app

from .conftest import BASE, asgi_client, settings, validate

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                    st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)

FIELDS = ["model", "messages", "prompt", "stream", "stream_options", "max_tokens", "max_completion_tokens",
          "temperature", "top_p", "seed", "stop", "n", "user", "logprobs", "tools", "response_format", "echo"]
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]) | json_values,
                                 "content": st.text(max_size=30) | json_values})
valid_ish = st.fixed_dictionaries(
    {"model": st.sampled_from([BASE, "nope"]) | json_values,
     "messages": st.lists(message, max_size=3) | json_values},
    optional={name: json_values for name in FIELDS[2:]} | {
        "max_tokens": st.integers(-5, 3000), "stream": st.booleans(), "prompt": st.text(max_size=20)})
bodies = st.one_of(valid_ish, json_values, st.dictionaries(st.sampled_from(FIELDS), json_values))


def test_no_body_gets_a_5xx(tmp_path):
    app = create_app(settings(tmp_path, max_model_len=256, null_tokens=3))

    async def run_all(examples: list) -> None:
        async with asgi_client(app) as client:
            for path, body in examples:
                r = await client.post(path, content=json.dumps(body))
                assert r.status_code < 500, (body, r.text)
                if r.status_code >= 400:
                    validate(r.json(), "ErrorResponse")

    examples: list = []

    @hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), bodies)
    def gather(path, body):
        examples.append((path, body))

    gather()
    asyncio.run(run_all(examples))
    assert len(examples) >= 400
