"""Probes the gateway's Envoy for the limits a client meets, with independent
clients (aioquic, Python's ssl and the h2 library).

  edge_limits.py HOST PORT SERVER_NAME CA

Writes one JSON object:
  "quic_ticket": whether a QUIC session ticket was issued, and
  "quic_max_early_data": the 0-RTT data it allows (null or 0: none);
  "h2_max_concurrent_streams": the SETTINGS_MAX_CONCURRENT_STREAMS Envoy sends over
      HTTP/2 (null when it sends none: unlimited);
  "unrouted_status", "unrouted_secs": the answer to a POST to a path no route
      serves whose 1 MiB body is announced but never sent, and how long it took
      (Envoy answers at the headers, or waits for the body until its timeout).
"""
import asyncio
import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
from aioquic.asyncio import connect
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration


async def quic_ticket(host, port, server_name, ca):
    tickets = []
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=server_name)
    cfg.load_verify_locations(ca)
    async with connect(host, port, configuration=cfg, session_ticket_handler=tickets.append) as c:
        await c.ping()
        # Tickets come after the handshake; give them a moment.
        for _ in range(50):
            if tickets:
                break
            await asyncio.sleep(0.02)
    if not tickets:
        return False, None
    return True, tickets[-1].max_early_data_size


def tls_socket(host, port, server_name, ca, alpn):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection((host, port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname=server_name)


def h2_max_streams(host, port, server_name, ca):
    s = tls_socket(host, port, server_name, ca, ["h2"])
    try:
        assert s.selected_alpn_protocol() == "h2", s.selected_alpn_protocol()
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        s.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    changed = ev.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
                    return changed.new_value if changed else None
        raise SystemExit("edge_limits: no SETTINGS from the server")
    finally:
        s.close()


def unrouted(host, port, server_name, ca):
    s = tls_socket(host, port, server_name, ca, ["http/1.1"])
    s.settimeout(15)
    try:
        start = time.monotonic()
        s.sendall((f"POST /no-such-page HTTP/1.1\r\nHost: {server_name}\r\n"
                   "Content-Type: application/octet-stream\r\n"
                   f"Content-Length: {1 << 20}\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        took = time.monotonic() - start
        line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        parts = line.split()
        return (int(parts[1]) if len(parts) > 1 else None), took
    except socket.timeout:
        return None, time.monotonic() - start
    finally:
        s.close()


def main():
    host, port, server_name, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ticket, early = asyncio.run(quic_ticket(host, port, server_name, ca))
    status, took = unrouted(host, port, server_name, ca)
    print(json.dumps({
        "quic_ticket": ticket,
        "quic_max_early_data": early,
        "h2_max_concurrent_streams": h2_max_streams(host, port, server_name, ca),
        "unrouted_status": status,
        "unrouted_secs": round(took, 3),
    }))


if __name__ == "__main__":
    main()
