"""``tensafe-scaler``: KEDA's external scaler for the gateway's backend pools.

    tensafe-scaler --listen 0.0.0.0:9090 --gateway-dns tensafe-gateway-headless:8000 \\
        --metrics-key-file /var/run/secrets/tensafe/metrics-key
    tensafe-scaler --listen 0.0.0.0:9090 --prometheus http://prometheus:9090

The gateways' numbers come from scraping each replica (``--gateway`` URLs and/or every address
of ``--gateway-dns``, with a ``metrics``-scope key read from a file or
``TENSAFE_SCALER_METRICS_KEY``; the key is never logged) or from Prometheus. ``--tls-cert`` and
``--tls-key`` serve gRPC over TLS (KEDA's ``caCert``/``tlsCertFile`` trigger settings).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import grpc

from .service import serve
from .sources import PromSource, ScrapeSource, Source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tensafe-scaler", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", default="0.0.0.0:9090", help="gRPC address (host:port)")
    ap.add_argument("--gateway", action="append", default=[], metavar="URL", help="a gateway replica (repeatable)")
    ap.add_argument("--gateway-dns", metavar="HOST:PORT", help="a headless Service listing the gateway replicas")
    ap.add_argument("--scheme", default="http", choices=("http", "https"), help="for --gateway-dns addresses")
    ap.add_argument("--ca-file", help="CA bundle to verify the gateways (or Prometheus) over https")
    ap.add_argument("--metrics-key-file", help="file holding a metrics-scope key for the gateways")
    ap.add_argument("--prometheus", metavar="URL", help="ask Prometheus instead of scraping the gateways")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between scrape rounds")
    ap.add_argument("--window", type=float, default=120.0, help="longest window any ScaledObject may ask for (s)")
    ap.add_argument("--tls-cert", help="serve gRPC over TLS with this certificate chain")
    ap.add_argument("--tls-key", help="... and this private key")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    if not (args.gateway or args.gateway_dns or args.prometheus):
        ap.error("name where the metrics come from: --gateway, --gateway-dns or --prometheus")
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    return args


def make_source(args: argparse.Namespace) -> Source:
    verify: bool | str = args.ca_file or True
    if args.prometheus:
        return PromSource(args.prometheus, interval_s=args.interval, verify=verify)
    key = os.environ.get("TENSAFE_SCALER_METRICS_KEY", "")
    if args.metrics_key_file:
        with open(args.metrics_key_file, encoding="utf-8") as f:
            key = f.read().strip()
    dns = None
    if args.gateway_dns:
        host, _, port = args.gateway_dns.rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit("--gateway-dns takes HOST:PORT")
        dns = (host, int(port))
    return ScrapeSource(urls=args.gateway, dns=dns, scheme=args.scheme, key=key, interval_s=args.interval,
                        window_s=args.window, verify=verify)


async def run(args: argparse.Namespace) -> None:
    credentials = None
    if args.tls_cert:
        with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
            credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
    source = make_source(args)
    server = await serve(source, args.listen, credentials=credentials)
    logging.getLogger("tensafe.scaler").info("scaler listening on %s", args.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)
    await source.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run(args))
