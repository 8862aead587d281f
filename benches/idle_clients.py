#!/usr/bin/env python3
"""Memory per idle client: opens N logged-in, idle client connections to a running pgweir
(trust auth) over the raw protocol and reports the growth of pgweir's resident set size.

    ulimit -n 100000
    python3 benches/idle_clients.py --port 6432 --pid $(pidof pgweir) [-n 10000] [--user u --db d] [--tls] [--queries 3]

With --tls each client asks for TLS (SSLRequest) and logs in over it, certificate unchecked;
the proxy must be configured for client TLS. --pid may name any proxy (PgBouncer too).
With --queries N each client runs N simple queries (`SELECT 1`) after logging in, then idles:
the memory of a client that has worked and gone idle (what a session keeps between
transactions shows here). pgweir serves a client's transactions on its task until it has been
connected for listen.event_loop_after (default 100 ms), then in an event loop: the queries run
right after the login, so a proxy with the default measures the first kind; one with
event_loop_after = 0 the second.

Each client sends a StartupMessage and reads until ReadyForQuery, then stays idle. RSS is read
from /proc/PID/status (VmRSS) before connecting and after every client is logged in and a
settle pause, so it includes every per-client buffer, task and registry entry the proxy keeps
for an idle client (and no server connection: pgweir only checks one out per transaction).
"""

import argparse
import asyncio
import ssl
import struct
import sys
import time


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def startup(user: str, db: str) -> bytes:
    body = struct.pack("!i", 196608)
    for k, v in (("user", user), ("database", db), ("application_name", "idle_clients")):
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


async def login(host: str, port: int, packet: bytes, tls: ssl.SSLContext | None = None):
    reader, writer = await asyncio.open_connection(host, port)
    if tls is not None:
        writer.write(struct.pack("!ii", 8, 80877103))
        await writer.drain()
        if await reader.readexactly(1) != b"S":
            raise RuntimeError("the proxy refused TLS: configure client TLS")
        await writer.start_tls(tls)
    writer.write(packet)
    await writer.drain()
    await until_ready(reader, "login refused")
    return reader, writer


async def query(reader, writer, sql: bytes):
    writer.write(b"Q" + struct.pack("!i", len(sql) + 5) + sql + b"\0")
    await writer.drain()
    await until_ready(reader, "query failed")


async def until_ready(reader, failed: str):
    """Reads messages up to ReadyForQuery; an ErrorResponse is `failed`."""
    while True:
        hdr = await reader.readexactly(5)
        tag, length = hdr[0:1], struct.unpack("!i", hdr[1:5])[0]
        body = await reader.readexactly(length - 4)
        if tag == b"E":
            raise RuntimeError(f"{failed}: {body!r}")
        if tag == b"R" and struct.unpack("!i", body[:4])[0] != 0:
            raise RuntimeError("server asked for a password: configure auth_type = \"trust\"")
        if tag == b"Z":
            return


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True, help="pgweir's process id")
    ap.add_argument("-n", "--clients", type=int, default=10_000)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--db", default="bench")
    ap.add_argument("--concurrency", type=int, default=200, help="logins in flight at once")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before the second reading")
    ap.add_argument("--tls", action="store_true", help="log in over TLS (certificate not verified)")
    ap.add_argument("--queries", type=int, default=0, help="simple queries each client runs before idling")
    args = ap.parse_args()
    tls = None
    if args.tls:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE

    packet = startup(args.user, args.db)
    # One warm-up client so lazily created state (pool, server connection) is not counted.
    warm = await login(args.host, args.port, packet, tls)
    await asyncio.sleep(args.settle)
    before = rss_kib(args.pid)

    conns = []
    sem = asyncio.Semaphore(args.concurrency)

    async def one():
        async with sem:
            reader, writer = await login(args.host, args.port, packet, tls)
            for _ in range(args.queries):
                await query(reader, writer, b"SELECT 1")
            conns.append((reader, writer))

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(args.clients)))
    took = time.monotonic() - t0
    await asyncio.sleep(args.settle)
    after = rss_kib(args.pid)

    per = (after - before) / args.clients
    worked = f", {args.queries} queries each" if args.queries else ""
    print(f"{args.clients} idle clients logged in{worked} in {took:.1f} s")
    print(f"proxy VmRSS before {before} KiB, after {after} KiB, growth {after - before} KiB")
    print(f"{per:.2f} KiB per idle client")
    for _, w in conns + [warm]:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
