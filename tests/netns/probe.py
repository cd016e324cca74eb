"""Small network programs the netns tests run inside a `Lan`'s hosts.

    probe.py icmp DST [--timeout S]             one ICMP echo (raw socket, no iputils)
    probe.py echo-server --port P                TCP echo server, runs until killed
    probe.py rtt DST PORT [--count N] [--deadline S]
                                                 connect (retrying until the deadline),
                                                 then N one-byte round trips; prints JSON
    probe.py mdns-register --name N --ip A --port P [--txt k=v ...]
                                                 register a service, run until killed
    probe.py mdns-browse [--timeout S]           browse, resolve the first service found,
                                                 print it as JSON; exit 1 if none

Everything is bounded in time and prints its result on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import select
import signal
import socket
import struct
import sys
import threading
import time

SERVICE_TYPE = "_shoaltest._tcp.local."


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp(args: argparse.Namespace) -> int:
    ident, seq = os.getpid() & 0xFFFF, 1
    payload = b"shoal-netns-ping"
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    packet = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq) + payload
    deadline = time.monotonic() + args.timeout
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.sendto(packet, (args.dst, 0))
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data, (source, _) = sock.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            kind, _, _, r_ident, r_seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if source == args.dst and kind == 0 and (r_ident, r_seq) == (ident, seq):
                print(json.dumps({"rtt_ms": (time.monotonic() - start) * 1000}))
                return 0
    print(f"no echo reply from {args.dst} within {args.timeout} s", file=sys.stderr)
    return 1


def echo_server(args: argparse.Namespace) -> int:
    def serve(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)

    with socket.create_server(("0.0.0.0", args.port), reuse_port=True) as server:
        print("listening", flush=True)
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()


def rtt(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.deadline
    last: OSError | None = None
    while (left := deadline - time.monotonic()) > 0:
        start = time.monotonic()
        try:
            sock = socket.create_connection((args.dst, args.port), timeout=min(left, 2))
        except OSError as exc:  # server not up yet, or unreachable
            last = exc
            time.sleep(0.05)
            continue
        with sock:
            connect_ms = (time.monotonic() - start) * 1000
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            rtts = []
            for _ in range(args.count):
                start = time.monotonic()
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    print("echo server closed the connection", file=sys.stderr)
                    return 1
                rtts.append((time.monotonic() - start) * 1000)
        print(json.dumps({"connect_ms": connect_ms, "rtts_ms": rtts}))
        return 0
    print(f"no connection to {args.dst}:{args.port}: {last!r}", file=sys.stderr)
    return 1


def mdns_register(args: argparse.Namespace) -> int:
    from zeroconf import ServiceInfo, Zeroconf

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    properties = dict(item.split("=", 1) for item in args.txt)
    info = ServiceInfo(
        args.service_type,
        f"{args.name}.{args.service_type}",
        addresses=[socket.inet_aton(args.ip)],
        port=args.port,
        properties=properties,
        server=f"{args.name}.local.",
    )
    zc = Zeroconf()
    try:
        zc.register_service(info)
        print("registered", flush=True)
        while True:
            time.sleep(3600)
    finally:
        zc.close()  # unregisters: sends the goodbye packets


def mdns_browse(args: argparse.Namespace) -> int:
    from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

    found: queue.Queue[str] = queue.Queue()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Added:
            found.put(name)

    deadline = time.monotonic() + args.timeout
    zc = Zeroconf()
    browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                name = found.get(timeout=left)
            except queue.Empty:
                break
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=int(max(left, 0.5) * 1000))
            if info is None:
                continue
            result = {
                "name": name,
                "addresses": info.parsed_addresses(),
                "port": info.port,
                "properties": {k.decode(): (v or b"").decode() for k, v in info.properties.items()},
                "elapsed_s": args.timeout - (deadline - time.monotonic()),
            }
            print(json.dumps(result), flush=True)
            return 0
    finally:
        browser.cancel()
        zc.close()
    print(f"no {SERVICE_TYPE} service found within {args.timeout} s", file=sys.stderr)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("icmp")
    p.add_argument("dst")
    p.add_argument("--timeout", type=float, default=2)
    p.set_defaults(run=icmp)
    p = sub.add_parser("echo-server")
    p.add_argument("--port", type=int, required=True)
    p.set_defaults(run=echo_server)
    p = sub.add_parser("rtt")
    p.add_argument("dst")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--deadline", type=float, default=10)
    p.set_defaults(run=rtt)
    p = sub.add_parser("mdns-register")
    p.add_argument("--name", required=True)
    p.add_argument("--ip", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--txt", action="append", default=[])
    p.add_argument("--service-type", default=SERVICE_TYPE)
    p.set_defaults(run=mdns_register)
    p = sub.add_parser("mdns-browse")
    p.add_argument("--timeout", type=float, default=10)
    p.set_defaults(run=mdns_browse)
    args = parser.parse_args()
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
