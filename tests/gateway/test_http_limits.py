"""Connection limits of the gateway's HTTP protocol (gateway/http_protocol.py) on a real uvicorn,
driven with raw sockets: stalled headers time out with a 408, oversized headers get a 431, a
server at its connection limit answers a JSON 503, and ordinary clients notice none of it."""
from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from gateway.app import create_app

from .conftest import API_KEY, BASE, Server, settings

RECV_TIMEOUT_S = 5.0
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@contextlib.contextmanager
def serving(tmp_path, **overrides: Any) -> Iterator[Server]:
    values = {"header_timeout_s": 0.5, **overrides}
    with Server(create_app(settings(tmp_path, **values))) as server:
        yield server


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=RECV_TIMEOUT_S)


def recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except TimeoutError:
        pytest.fail(f"the server neither answered nor closed within {RECV_TIMEOUT_S} s")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response with a content-length body: (status, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = recv(sock)
        assert chunk, f"connection closed before a complete response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = recv(sock)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def assert_closed(sock: socket.socket) -> None:
    assert recv(sock) == b"", "the connection stayed open"


def assert_refused(sock: socket.socket, status: int, code: str, error_type: str = "invalid_request_error") -> dict:
    got, headers, body = read_response(sock)
    assert got == status
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == error_type and error["code"] == code and error["param"] is None and error["message"]
    assert_closed(sock)
    return headers


def test_stalled_headers_get_a_408_and_the_connection_closes(tmp_path):
    with serving(tmp_path) as server, connect(server) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert_refused(sock, 408, "header_timeout")
        assert time.monotonic() - t0 < 4


def test_a_kept_alive_connection_stalling_in_its_next_request_gets_a_408(tmp_path):
    with serving(tmp_path) as server, connect(server) as sock:
        sock.sendall(HEALTH)
        status, headers, _ = read_response(sock)
        assert status == 200 and headers.get("connection") != "close"
        time.sleep(0.7)  # past the header timeout: only a started request is timed
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        assert_refused(sock, 408, "header_timeout")


def test_blank_lines_between_requests_do_not_keep_a_connection_open(tmp_path):
    with serving(tmp_path, keep_alive_timeout_s=30.0) as server, connect(server) as sock:
        sock.sendall(HEALTH)
        assert read_response(sock)[0] == 200
        sock.sendall(b"\r\n")  # begins no request, yet stops uvicorn's keep-alive clock
        assert_closed(sock)


def test_a_connection_that_sends_nothing_is_closed_without_a_response(tmp_path):
    with serving(tmp_path) as server, connect(server) as sock:
        t0 = time.monotonic()
        assert_closed(sock)
        assert time.monotonic() - t0 < 4


def test_a_slow_request_within_the_timeout_succeeds(tmp_path):
    with serving(tmp_path, header_timeout_s=3.0) as server, connect(server) as sock:
        for piece in (b"GET /hea", b"lth HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: yes\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(0.1)
        assert read_response(sock)[0] == 200


def test_an_oversized_header_block_gets_a_431(tmp_path):
    big = b"X-Big: " + b"a" * 8000 + b"\r\n"
    with serving(tmp_path, max_header_bytes=4096) as server:
        with connect(server) as sock:  # the whole block at once
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
            assert_refused(sock, 431, "headers_too_large")
        with connect(server) as sock:  # headers that never end
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            for _ in range(3):
                sock.sendall(big[:3000])
                time.sleep(0.05)
            assert_refused(sock, 431, "headers_too_large")
        with connect(server) as sock:  # headers under the limit still pass
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Some: " + b"a" * 2000 + b"\r\n\r\n")
            assert read_response(sock)[0] == 200


def test_a_large_body_is_not_counted_as_headers(tmp_path):
    body = json.dumps({"model": BASE, "max_tokens": 2,
                       "messages": [{"role": "user", "content": "x " * 100_000}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with serving(tmp_path, max_header_bytes=4096) as server, connect(server) as sock:
        sock.sendall(head + body)
        status, _, _ = read_response(sock)
        assert status != 431 and status < 500
        sock.sendall(HEALTH)  # and the connection is still good
        assert read_response(sock)[0] == 200


def test_at_the_connection_limit_a_request_gets_a_json_503(tmp_path):
    with serving(tmp_path, max_connections=2, header_timeout_s=10.0) as server:
        with connect(server) as first, connect(server) as second:
            deadline = time.monotonic() + RECV_TIMEOUT_S
            while len(server.server.server_state.connections) < 2:
                assert time.monotonic() < deadline, "the idle connections were never accepted"
                time.sleep(0.01)
            with connect(server) as third:
                third.sendall(HEALTH)
                headers = assert_refused(third, 503, "overloaded", error_type="server_error")
                assert int(headers["retry-after"]) >= 1
        with connect(server) as sock:  # capacity again once they are gone
            deadline = time.monotonic() + RECV_TIMEOUT_S
            while len(server.server.server_state.connections) > 1:
                assert time.monotonic() < deadline, "closed connections were never released"
                time.sleep(0.01)
            sock.sendall(HEALTH)
            assert read_response(sock)[0] == 200


def test_the_openai_client_works_through_the_limits(tmp_path):
    with serving(tmp_path) as server, openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                                    max_retries=0) as client:
        reply = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
        time.sleep(0.7)  # an idle pooled connection past the header timeout is not refused
        assert client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}]).choices
