"""/api/realtime through Envoy, as the local gateway runs it (run-gateway.sh):
a WebSocket over HTTP/1.1 (upgrade), over HTTP/2 (RFC 8441 extended CONNECT, the
h2 state machine on a TLS socket) and over HTTP/3 (RFC 9220, aioquic), all open at
once. Each must: be refused without a token (401 jwt_missing) or with a token whose
role is not on the ladder (403 forbidden_role); accept the token as the subprotocol
`bearer.<jwt>` and select `gw.realtime.v1`; say hello (schema 1, both modules); then
carry, as they happen, the decisions of a command sent through the JSON route, the
module state it set, a refused command's code, and a Solana transaction's send
outcome.

  realtime.py --run .run --gwctl PATH [--python PATH]
"""
import argparse
import asyncio
import base64
import hashlib
import json
import os
import ssl
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import h2.config
import h2.connection
import h2.events
import h2.settings
from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

HOST, PORT, NAME = "127.0.0.1", 8443, "localhost"
PATH = "/api/realtime"
SUBPROTOCOL = "gw.realtime.v1"
DEADLINE = 20.0


def fail(msg):
    print(f"realtime.py: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


# ------------------------------------------------------------------ WebSocket frames

def frame(opcode, payload=b""):
    """A client frame (masked, RFC 6455 §5.3)."""
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Frames:
    """Server frames from a byte stream (unmasked; fragments joined)."""

    def __init__(self):
        self.buf = b""
        self.partial = b""

    def feed(self, data):
        self.buf += data
        out = []
        while True:
            if len(self.buf) < 2:
                return out
            b0, b1 = self.buf[0], self.buf[1]
            if b1 & 0x80:
                raise ValueError("a server frame must not be masked")
            n, off = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return out
                n, off = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return out
                n, off = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < off + n:
                return out
            payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
            opcode, fin = b0 & 0x0F, b0 & 0x80
            if opcode == 0:
                self.partial += payload
                if fin:
                    out.append((1, self.partial))
                    self.partial = b""
            elif not fin:
                self.partial = payload
            else:
                out.append((opcode, payload))


class Stream:
    """One WebSocket: messages (decoded JSON) arrive on `queue`."""

    def __init__(self, name):
        self.name = name
        self.frames = Frames()
        self.queue = asyncio.Queue()
        self.status = None
        self.protocol = None
        self.body = b""
        self.write = None  # bytes -> None
        self.closed = None

    def data(self, chunk):
        for opcode, payload in self.frames.feed(chunk):
            if opcode == 1:
                self.queue.put_nowait(json.loads(payload))
            elif opcode == 9:  # ping: answer, as a browser does
                self.write(frame(10, payload))
            elif opcode == 8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                self.closed = code
                self.queue.put_nowait({"type": "_closed", "code": code})

    async def until(self, pred, what):
        seen = []
        end = time.monotonic() + DEADLINE
        while True:
            left = end - time.monotonic()
            if left <= 0:
                fail(f"{self.name}: no {what} within {DEADLINE}s; saw {json.dumps(seen)[:1500]}")
            try:
                m = await asyncio.wait_for(self.queue.get(), left)
            except asyncio.TimeoutError:
                continue
            if pred(m):
                return m
            seen.append(m)


def tls_context(ca, alpn):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(alpn)
    return ctx


def offer(token):
    return f"{SUBPROTOCOL}, bearer.{token}" if token else SUBPROTOCOL


async def open_h1(ca, token, name="http/1.1"):
    s = Stream(name)
    reader, writer = await asyncio.open_connection(HOST, PORT, ssl=tls_context(ca, ["http/1.1"]),
                                                   server_hostname=NAME)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {PATH} HTTP/1.1\r\nHost: {NAME}:{PORT}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Protocol: {offer(token)}\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
    lines = head.decode().split("\r\n")
    s.status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
    s.protocol = hdrs.get("sec-websocket-protocol")
    # RFC 6455 §4.2.2: a 101 must prove it read our key (Envoy carries the upgrade
    # to the sidecar as an HTTP/2 stream; the sidecar answers the key it passes on).
    want = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC11B65").encode()).digest()).decode()
    if s.status == 101 and hdrs.get("sec-websocket-accept") != want:
        fail(f"{name}: Sec-WebSocket-Accept {hdrs.get('sec-websocket-accept')!r}, expected {want!r}")
    if s.status != 101:
        n = int(hdrs.get("content-length", "0"))
        s.body = await reader.readexactly(n) if n else b""
        writer.close()
        return s
    s.write = writer.write

    async def pump():
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            s.data(chunk)
    s.task = asyncio.create_task(pump())
    s.close = lambda: writer.write(frame(8, struct.pack("!H", 1000)))
    return s


async def open_h2(ca, token):
    s = Stream("http/2")
    reader, writer = await asyncio.open_connection(HOST, PORT, ssl=tls_context(ca, ["h2"]),
                                                   server_hostname=NAME)
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True,
                                                                      header_encoding="utf-8"))
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    # RFC 8441: the server must announce SETTINGS_ENABLE_CONNECT_PROTOCOL first.
    enabled = False
    while not enabled:
        data = await asyncio.wait_for(reader.read(65536), DEADLINE)
        if not data:
            fail("http/2: connection closed before SETTINGS")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                setting = ev.changed_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL)
                if setting is not None:
                    enabled = setting.new_value == 1
        writer.write(conn.data_to_send())
        if not enabled and conn.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) == 0:
            fail("http/2: Envoy does not allow extended CONNECT (RFC 8441)")
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                            (":authority", f"{NAME}:{PORT}"), (":path", PATH),
                            ("sec-websocket-version", "13"), ("sec-websocket-protocol", offer(token))])
    writer.write(conn.data_to_send())
    got_headers = asyncio.get_running_loop().create_future()

    def write(b):
        conn.send_data(sid, b)
        writer.write(conn.data_to_send())
    s.write = write

    async def pump():
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    hd = dict(ev.headers)
                    s.status = int(hd[":status"])
                    s.protocol = hd.get("sec-websocket-protocol")
                    if not got_headers.done():
                        got_headers.set_result(True)
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                    if s.status == 200:
                        s.data(ev.data)
                    else:
                        s.body += ev.data
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    s.queue.put_nowait({"type": "_ended"})
            writer.write(conn.data_to_send())
    s.task = asyncio.create_task(pump())
    await asyncio.wait_for(got_headers, DEADLINE)
    if s.status != 200:
        await asyncio.sleep(0.3)  # the error body
    s.close = lambda: write(frame(8, struct.pack("!H", 1000)))
    return s


class H3(QuicConnectionProtocol):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.http = H3Connection(self._quic)
        self.streams = {}

    def quic_event_received(self, event):
        for ev in self.http.handle_event(event):
            s = self.streams.get(getattr(ev, "stream_id", None))
            if s is None:
                continue
            if isinstance(ev, HeadersReceived):
                hd = {k.decode(): v.decode() for k, v in ev.headers}
                s.status = int(hd[":status"])
                s.protocol = hd.get("sec-websocket-protocol")
                if not s.headers_seen.done():
                    s.headers_seen.set_result(True)
            elif isinstance(ev, DataReceived):
                if s.status == 200:
                    s.data(ev.data)
                else:
                    s.body += ev.data


async def open_h3(ca, token, stack):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=NAME)
    cfg.load_verify_locations(ca)
    cm = connect(HOST, PORT, configuration=cfg, create_protocol=H3)
    client = await stack.enter_async_context(cm)
    s = Stream("http/3")
    s.headers_seen = asyncio.get_running_loop().create_future()
    sid = client._quic.get_next_available_stream_id()
    client.streams[sid] = s
    # RFC 9220: extended CONNECT over HTTP/3 (aioquic sends it as given).
    client.http.send_headers(sid, [(b":method", b"CONNECT"), (b":protocol", b"websocket"),
                                   (b":scheme", b"https"), (b":authority", f"{NAME}:{PORT}".encode()),
                                   (b":path", PATH.encode()), (b"sec-websocket-version", b"13"),
                                   (b"sec-websocket-protocol", offer(token).encode())])
    client.transmit()

    def write(b):
        client.http.send_data(sid, b, end_stream=False)
        client.transmit()
    s.write = write
    await asyncio.wait_for(s.headers_seen, DEADLINE)
    if s.status != 200:
        await asyncio.sleep(0.3)
    s.close = lambda: write(frame(8, struct.pack("!H", 1000)))
    return s


# ------------------------------------------------------------------ the gateway's side

def gwctl_jwt(gwctl, run, role, sub):
    return subprocess.check_output([gwctl, "jwt", "--secret-file", f"{run}/keys/jwt.secret.hex",
                                    "--sub", sub, "--role", role, "--ttl", "10m", "--kid", "dev"],
                                   text=True).strip()


def post(run, token, path, body, ctype="application/json"):
    ctx = ssl.create_default_context(cafile=f"{run}/certs/ca.pem")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"https://{NAME}:{PORT}{path}", data=data, method="POST",
                                 headers={"authorization": f"Bearer {token}", "content-type": ctype})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=15) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--gwctl", required=True)
    ap.add_argument("--python", default=sys.executable)
    a = ap.parse_args()
    run, ca = a.run, f"{a.run}/certs/ca.pem"
    admin = gwctl_jwt(a.gwctl, run, "admin", "realtime-admin")
    viewer = gwctl_jwt(a.gwctl, run, "viewer", "realtime-viewer")
    auditor = gwctl_jwt(a.gwctl, run, "auditor", "realtime-auditor")

    # Refusals at the edge, on each protocol.
    from contextlib import AsyncExitStack
    async with AsyncExitStack() as stack:
        for opener in (open_h1, open_h2, lambda c, t: open_h3(c, t, stack)):
            for token, status, code in ((None, 401, "jwt_missing"), (auditor, 403, "forbidden_role"),
                                        ("x.y.z", 401, "jwt_malformed")):
                s = await opener(ca, token)
                body = json.loads(s.body or b"{}")
                if s.status != status or body.get("error") != code:
                    fail(f"{s.name}: token {str(token)[:12]}: expected {status} {code}, got {s.status} {s.body[:200]!r}")
                if getattr(s, "task", None):
                    s.task.cancel()
        print("realtime.py: refused without a token (401 jwt_missing), with a bad one (401), "
              "with a role off the ladder (403 forbidden_role) on HTTP/1.1, HTTP/2 and HTTP/3")

        streams = [await open_h1(ca, viewer), await open_h2(ca, admin), await open_h3(ca, viewer, stack)]
        for s in streams:
            if s.status not in (101, 200) or s.protocol != SUBPROTOCOL:
                fail(f"{s.name}: status {s.status}, subprotocol {s.protocol!r}, body {s.body[:300]!r}")
            hello = await s.until(lambda m: m.get("type") == "hello", "hello")
            if hello.get("schema") != 1 or set(hello.get("modules") or {}) != {"arbitrage", "mev"}:
                fail(f"{s.name}: hello {hello}")
        print("realtime.py: three streams open (HTTP/1.1 101, HTTP/2 and HTTP/3 extended CONNECT 200), "
              f"subprotocol {SUBPROTOCOL}, hello with both modules")

        pct = 37 + int(time.time()) % 50
        status, body = post(run, admin, "/api/control/module/mev:throttle", {"throttle_pct": pct})
        if status != 200 or not body.get("applied"):
            fail(f"JSON throttle: {status} {body}")
        rid = body["request_id"]
        status, bad = post(run, admin, "/api/control/module/mev:throttle", {"throttle_pct": 150})
        if status != 400 or bad.get("error") != "bad_args":
            fail(f"a throttle of 150 %: expected 400 bad_args, got {status} {bad}")
        for s in streams:
            applied = await s.until(lambda m: m.get("type") == "decision" and m.get("request_id") == rid
                                    and m.get("decision") == "applied", f"applied row of {rid}")
            if applied.get("module") != "mev" or applied.get("action") != "throttle":
                fail(f"{s.name}: {applied}")
            await s.until(lambda m: m.get("type") == "module" and m.get("module") == "mev"
                          and m["state"].get("throttle_pct") == pct, f"mev at {pct} %")
            await s.until(lambda m: m.get("type") == "decision" and m.get("code") == "bad_args",
                          "the refused command's row (bad_args)")
        print(f"realtime.py: each stream saw request {rid} applied, mev at {pct} %, and the refusal bad_args")

        # A Solana transaction through /api/rpc: its send outcome on every stream.
        post(run, admin, "/api/control/module/arbitrage:start", {})
        tx = json.loads(subprocess.check_output(
            [a.python, os.path.join(os.path.dirname(__file__), "..", "..", "sidecar", "tests", "py", "solana_txs.py"), "1"],
            text=True).splitlines()[0])
        status, sent = post(run, admin, "/api/rpc", {"jsonrpc": "2.0", "id": 1, "method": "sendTransaction",
                                                     "params": [tx["b64"], {"encoding": "base64", "skipPreflight": True}]})
        if sent.get("result") != tx["signature"]:
            fail(f"sendTransaction: {status} {sent}")
        for s in streams:
            m = await s.until(lambda m: m.get("type") == "send" and m.get("signature") == tx["signature"],
                              f"send outcome of {tx['signature']}")
            if m.get("outcome") != "landed" or m.get("route") not in ("tpu", "relay"):
                fail(f"{s.name}: send {m}")
        print(f"realtime.py: each stream saw the send of {tx['signature'][:16]}… (landed)")

        # A client that sends data is closed with 1008 (the stream takes none).
        chatty = await open_h1(ca, viewer, name="http/1.1 (chatty)")
        await chatty.until(lambda m: m.get("type") == "hello", "hello")
        chatty.write(frame(1, b'{"type":"subscribe"}'))
        await chatty.until(lambda m: m.get("type") == "_closed", "the close of a client that sent data")
        if chatty.closed != 1008:
            fail(f"a client that sent data was closed with {chatty.closed}, expected 1008")
        chatty.task.cancel()
        print("realtime.py: a client that sends data is closed with 1008")

        for s in streams:
            s.close()
        for s in streams:
            await s.until(lambda m: m.get("type") == "_closed", "the server's close frame")
            if s.closed != 1000:
                fail(f"{s.name}: closed with {s.closed}")
            if getattr(s, "task", None):
                s.task.cancel()
    print("realtime.py: ok")


if __name__ == "__main__":
    asyncio.run(main())
