"""Hostile-input suite against the running local gateway (scripts/run-gateway.sh):
JWT tricks, forged, truncated and oversize commands, scope and route mismatches,
header spoofing, path tricks and calls straight to the sidecar. Each edge case runs
over HTTP/3 (aioquic) and over HTTP/2 (the h2 state machine on a TLS socket, with
header validation off so the bytes are exactly the case's), and asserts the exact
status, the error code of the JSON body, and the ledger row the refusal left in
ClickHouse (stage, decision, code, and the requester where one was verified).

  hostile.py --run .run [--only SUBSTRING] [--list]

Independent of the gateway's code: tokens come from PyJWT, commands from the
original API's signer (Python protobuf + PyNaCl), transactions are not needed.
Exit status 0 when every case holds; otherwise each failing case is printed.
"""
import argparse
import asyncio
import atexit
import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
import uuid

import h2.config
import h2.connection
import h2.events
import jwt as pyjwt
from nacl.signing import SigningKey

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "testkit", "py"))
from h3_client import Client as H3Client  # noqa: E402  (aioquic, one connection)

from aioquic.asyncio import connect  # noqa: E402
from aioquic.h3.connection import H3_ALPN  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402

GATEWAY = ("127.0.0.1", 8443)
SIDECAR = ("127.0.0.1", 8080)
OPS = ("127.0.0.1", 9464)
CLICKHOUSE = "http://127.0.0.1:8123/"
COMMANDS = "/api/control/commands"
PB = "application/x-protobuf"


def load_protos():
    from grpc_tools import protoc
    out = tempfile.mkdtemp(prefix="gw-hostile-pb-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    rc = protoc.main(["protoc", f"-I{os.path.join(ROOT, 'proto')}", f"--python_out={out}", "control.proto"])
    if rc != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    import control_pb2
    return control_pb2


pb = load_protos()


# --- what the suite signs and mints -------------------------------------------

class Keys:
    def __init__(self, run):
        self.run = run
        self.sk = SigningKey(bytes.fromhex(open(f"{run}/keys/op-admin-1.sk.hex").read().strip()))
        self.jwt_secret = bytes.fromhex(open(f"{run}/keys/jwt.secret.hex").read().strip())
        self.ch_admin = open(f"{run}/keys/clickhouse-admin.pw").read().strip()
        self.ca = f"{run}/certs/ca.pem"
        self.nonce = time.time_ns()

    def next_nonce(self):
        self.nonce += 1
        return self.nonce

    def token(self, sub, roles=("admin",), alg="HS256", key=None, headers=None, **claims):
        now = int(time.time())
        roles = list(roles) if isinstance(roles, (list, tuple)) else roles
        body = {"iss": "defi-dashboard", "aud": "defi-users", "sub": sub, "roles": roles,
                "iat": now, "exp": now + 600}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        h = {"kid": "dev"}
        h.update(headers or {})
        return pyjwt.encode(body, key if key is not None else self.jwt_secret, algorithm=alg, headers=h)

    def command(self, module="mev", action="throttle", args=None, ts=None, nonce=None,
                issuer="dashboard", schema="ctrl-v1", pubkey_id="op-admin-1", sig_alg="ed25519-v1",
                sign_with=None, request_id=None):
        """A command signed as the original API signs (deterministic bytes, PyNaCl)."""
        c = pb.Command(ts=int(time.time()) if ts is None else ts,
                       module=getattr(pb.Command, module.upper()) if isinstance(module, str) else module,
                       action=getattr(pb.Command, action.upper()) if isinstance(action, str) else action,
                       request_id=request_id or f"hostile-{uuid.uuid4()}", issuer=issuer,
                       schema_version=schema, nonce=self.next_nonce() if nonce is None else nonce)
        if args is None and action == "throttle":
            args = {"throttle_pct": "100"}
        for k, v in (args or {}).items():
            c.args[k] = v
        payload = c.SerializeToString(deterministic=True)
        c.sig = (sign_with or self.sk).sign(payload).signature
        c.pubkey_id = pubkey_id
        c.sig_alg = sig_alg
        return c.SerializeToString(deterministic=True)


def record(field, value):
    """One protobuf LEN record (for hand-made hostile bodies)."""
    def varint(v):
        out = bytearray()
        while True:
            b = v & 0x7F
            v >>= 7
            out.append(b | (0x80 if v else 0))
            if not v:
                return bytes(out)
    return varint(field << 3 | 2) + varint(len(value)) + value


def strip_signature(body):
    c = pb.Command()
    c.ParseFromString(body)
    c.sig, c.pubkey_id, c.sig_alg = b"", "", ""
    return c.SerializeToString(deterministic=True)


def sign_raw(keys, payload, pubkey_id="op-admin-1"):
    return payload + record(8, keys.sk.sign(payload).signature) + record(9, pubkey_id.encode()) \
        + record(10, b"ed25519-v1")


# --- transports -----------------------------------------------------------------

class H2:
    """HTTP/2 over TLS with the h2 state machine: the request goes out as written."""

    def __init__(self, addr, ca, cert=None, authority="localhost:8443"):
        ctx = ssl.create_default_context(cafile=ca)
        ctx.set_alpn_protocols(["h2"])
        if cert:
            ctx.load_cert_chain(*cert)
        raw = socket.create_connection(addr, timeout=15)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        if self.sock.selected_alpn_protocol() != "h2":
            raise RuntimeError("the server did not choose h2")
        self.authority = authority
        cfg = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                        normalize_outbound_headers=False,
                                        validate_inbound_headers=False, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(cfg)
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def _pump(self, want_sid, resp):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        for ev in self.conn.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            if isinstance(ev, h2.events.ResponseReceived) and sid == want_sid:
                resp["headers"] = {k: v for k, v in ev.headers}
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                if sid == want_sid:
                    resp["body"] += ev.data
            elif isinstance(ev, h2.events.StreamEnded) and sid == want_sid:
                resp["done"] = True
            elif isinstance(ev, h2.events.StreamReset) and sid == want_sid:
                resp["done"] = True
                resp["reset"] = ev.error_code
            elif isinstance(ev, h2.events.ConnectionTerminated):
                resp["done"] = True
                resp["reset"] = ev.error_code
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def request(self, method, path, headers, body):
        sid = self.conn.get_next_available_stream_id()
        hs = [(":method", method), (":scheme", "https"), (":authority", self.authority),
              (":path", path)] + list(headers)
        if body:
            hs.append(("content-length", str(len(body))))
        self.conn.send_headers(sid, hs, end_stream=not body)
        self.sock.sendall(self.conn.data_to_send())
        resp = {"headers": {}, "body": b"", "done": False}
        view = memoryview(body)
        while view and not resp["done"]:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self._pump(sid, resp)
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(sid, bytes(chunk), end_stream=not view)
            self.sock.sendall(self.conn.data_to_send())
        while not resp["done"]:
            self._pump(sid, resp)
        return int(resp["headers"].get(":status", "0")), resp["body"]

    def close(self):
        try:
            self.conn.close_connection()
            self.sock.sendall(self.conn.data_to_send())
        except OSError:
            pass
        self.sock.close()


class H3:
    """HTTP/3 over QUIC (aioquic), one connection for the whole suite."""

    def __init__(self, ca):
        self.ca = ca
        self.loop = asyncio.new_event_loop()
        self.ctx = None
        self.client = None

    async def _open(self):
        cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
        cfg.load_verify_locations(self.ca)
        self.ctx = connect(GATEWAY[0], GATEWAY[1], configuration=cfg, create_protocol=H3Client)
        self.client = await self.ctx.__aenter__()

    def request(self, method, path, headers, body):
        if self.client is None:
            self.loop.run_until_complete(self._open())
        req = {"method": method, "path": path, "headers": [list(h) for h in headers],
               "body_hex": body.hex()}
        r = self.loop.run_until_complete(self.client.request(f"localhost:{GATEWAY[1]}", req))
        return int(r["headers"].get(":status", "0")), r["body"]

    def close(self):
        if self.ctx is not None:
            self.loop.run_until_complete(self.ctx.__aexit__(None, None, None))
        self.loop.close()


def route_of(path):
    """The route a ledger row names for a request's path (core's report_route):
    the path without its fragment, its query as `?sha256=<16 hex digits>`."""
    path = path.split("#")[0]
    if "?" not in path:
        return path
    route, query = path.split("?", 1)
    return route + "?sha256=" + hashlib.sha256(query.encode()).hexdigest()[:16]


# --- the cases ------------------------------------------------------------------

class Case:
    """A request and what must come of it.

    audit: None (no row: a read that succeeded or a refusal Envoy itself makes
    before the filter), or (stage, decision, code[, requester]) of the row found by
    the case's marker (the query string `hc=<id>` of its path, which a row names
    by its digest `?sha256=…`, or its body)."""

    def __init__(self, name, method, path, headers=(), body=b"", status=0, code=None, audit=None,
                 marker_in_path=True, why=""):
        self.name, self.method, self.path = name, method, path
        self.headers, self.body = list(headers), body
        self.status, self.code, self.audit = status, code, audit
        self.marker_in_path, self.why = marker_in_path, why


def edge_cases(k):
    """Cases sent through Envoy, each once per transport (fresh bodies each time)."""
    admin = k.token("hostile-admin")
    viewer = k.token("hostile-viewer", roles=("viewer",))
    operator = k.token("hostile-operator", roles=("operator",))
    auth = lambda t: ("authorization", f"Bearer {t}")
    cmd_h = lambda t=admin: [auth(t), ("content-type", PB)]
    json_h = lambda t=admin: [auth(t), ("content-type", "application/json")]
    now = int(time.time())
    E = lambda code, who="": ("edge", "rejected", code, who)
    S = lambda code, who="hostile-admin": ("sidecar", "rejected", code, who)
    cases = []
    add = lambda *a, **kw: cases.append(Case(*a, **kw))
    good = lambda **kw: k.command(**kw)

    # JWT tricks, on the command endpoint with a valid command.
    add("jwt: no token", "POST", COMMANDS, [("content-type", PB)], good(), 401, "jwt_missing", E("jwt_missing"))
    add("jwt: empty bearer", "POST", COMMANDS, [("authorization", "Bearer "), ("content-type", PB)], good(),
        401, "jwt_missing", E("jwt_missing"))
    add("jwt: basic scheme", "POST", COMMANDS, [("authorization", "Basic YWRtaW46YWRtaW4="), ("content-type", PB)],
        good(), 401, "jwt_missing", E("jwt_missing"))
    add("jwt: alg none", "POST", COMMANDS, cmd_h(k.token("x", alg="none", key="")), good(), 401, "jwt_alg",
        E("jwt_alg"))
    add("jwt: wrong secret", "POST", COMMANDS, cmd_h(k.token("x", key=b"w" * 32)), good(), 401, "jwt_signature",
        E("jwt_signature"))
    add("jwt: expired", "POST", COMMANDS, cmd_h(k.token("x", exp=now - 3600, iat=now - 7200)), good(), 401,
        "jwt_expired", E("jwt_expired"))
    add("jwt: nbf ahead", "POST", COMMANDS, cmd_h(k.token("x", nbf=now + 3600)), good(), 401,
        "jwt_not_yet_valid", E("jwt_not_yet_valid"))
    add("jwt: iat a day ahead", "POST", COMMANDS, cmd_h(k.token("x", iat=now + 86400)), good(), 401,
        "jwt_not_yet_valid", E("jwt_not_yet_valid"))
    add("jwt: no exp", "POST", COMMANDS, cmd_h(k.token("x", exp=None)), good(), 401, "jwt_missing_exp",
        E("jwt_missing_exp"))
    add("jwt: foreign issuer", "POST", COMMANDS, cmd_h(k.token("x", iss="evil")), good(), 401, "jwt_issuer",
        E("jwt_issuer"))
    add("jwt: foreign audience", "POST", COMMANDS, cmd_h(k.token("x", aud="other")), good(), 401, "jwt_audience",
        E("jwt_audience"))
    add("jwt: roles not a list", "POST", COMMANDS, cmd_h(k.token("x", roles=7)), good(), 401,
        "jwt_claims", E("jwt_claims"))
    add("jwt: oversize", "POST", COMMANDS, cmd_h(k.token("x", pad="p" * 9000)), good(), 401, "jwt_too_large",
        E("jwt_too_large"))
    add("jwt: unknown kid", "POST", COMMANDS, cmd_h(k.token("x", headers={"kid": "nope"})), good(), 401,
        "jwt_unknown_key", E("jwt_unknown_key"))
    hs = k.token("x")
    head = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "dev"}).encode()).rstrip(b"=").decode()
    add("jwt: RS256 header over an HMAC token", "POST", COMMANDS, cmd_h(head + hs[hs.index("."):]), good(), 401,
        "jwt_alg", E("jwt_alg"))
    head = base64.urlsafe_b64encode(json.dumps({"alg": "ES256", "kid": "dev"}).encode()).rstrip(b"=").decode()
    add("jwt: ES256 header, HMAC key (confusion)", "POST", COMMANDS, cmd_h(head + hs[hs.index("."):]), good(), 401,
        "jwt_alg", E("jwt_alg"))
    add("jwt: four segments", "POST", COMMANDS, cmd_h(hs + ".x"), good(), 401, "jwt_malformed", E("jwt_malformed"))
    add("jwt: not base64url", "POST", COMMANDS, cmd_h("a!b.c$d.e%f"), good(), 401, "jwt_malformed",
        E("jwt_malformed"))
    add("jwt: padded base64", "POST", COMMANDS, cmd_h(hs.split(".")[0] + "==." + ".".join(hs.split(".")[1:])),
        good(), 401, "jwt_malformed", E("jwt_malformed"))
    add("jwt: crit header", "POST", COMMANDS, cmd_h(k.token("x", headers={"crit": ["exp"]})), good(), 401,
        "jwt_malformed", E("jwt_malformed"))
    add("jwt: viewer on the command route", "POST", COMMANDS, cmd_h(viewer), good(), 403, "forbidden_role",
        E("forbidden_role", "hostile-viewer"))
    add("jwt: operator on the command route", "POST", COMMANDS, cmd_h(operator), good(), 403, "forbidden_role",
        E("forbidden_role", "hostile-operator"))
    add("jwt: no token on a read route", "GET", "/api/modules", [], b"", 401, "jwt_missing", E("jwt_missing"))
    add("jwt: viewer on an operator route", "GET", "/api/modules", [auth(viewer)], b"", 403, "forbidden_role",
        E("forbidden_role", "hostile-viewer"))

    # Forged, truncated, oversize commands.
    g = good()
    sig_at = g.index(k.sk.sign(strip_signature(g)).signature[:8])
    flipped = g[:sig_at] + bytes([g[sig_at] ^ 1]) + g[sig_at + 1:]
    add("cmd: flipped signature bit", "POST", COMMANDS, cmd_h(), flipped, 401, "bad_signature",
        E("bad_signature", "hostile-admin"))
    g = good()
    i = g.index(b"hostile-")
    add("cmd: changed byte", "POST", COMMANDS, cmd_h(), g[:i] + b"X" + g[i + 1:], 401, "bad_signature",
        E("bad_signature", "hostile-admin"))
    add("cmd: truncated", "POST", COMMANDS, cmd_h(), good()[:-7], 400, "malformed", E("malformed", "hostile-admin"))
    add("cmd: empty body", "POST", COMMANDS, cmd_h(), b"", 400, "malformed", E("malformed", "hostile-admin"))
    add("cmd: oversize (70 000 bytes)", "POST", COMMANDS, cmd_h(), good(args={"throttle_pct": "1", "pad": "p" * 70000}),
        413, "too_large", E("too_large", "hostile-admin"))
    add("cmd: unknown key id", "POST", COMMANDS, cmd_h(), good(pubkey_id="op-nobody"), 401, "unknown_key",
        E("unknown_key", "hostile-admin"))
    add("cmd: wrong sig_alg", "POST", COMMANDS, cmd_h(), good(sig_alg="ed25519"), 401, "sig_alg",
        E("sig_alg", "hostile-admin"))
    g = pb.Command()
    g.ParseFromString(good())
    g.sig = g.sig[:63]
    add("cmd: 63-byte signature", "POST", COMMANDS, cmd_h(), g.SerializeToString(), 401, "bad_sig_length",
        E("bad_sig_length", "hostile-admin"))
    add("cmd: other signer", "POST", COMMANDS, cmd_h(), good(sign_with=SigningKey(bytes(32))), 401,
        "bad_signature", E("bad_signature", "hostile-admin"))
    add("cmd: stale ts", "POST", COMMANDS, cmd_h(), good(ts=now - 300), 401, "stale", E("stale", "hostile-admin"))
    add("cmd: future ts", "POST", COMMANDS, cmd_h(), good(ts=now + 300), 401, "future", E("future", "hostile-admin"))
    add("cmd: nonce zero", "POST", COMMANDS, cmd_h(), good(nonce=0), 400, "bad_nonce",
        E("bad_nonce", "hostile-admin"))
    add("cmd: unknown schema", "POST", COMMANDS, cmd_h(), good(schema="ctrl-v9"), 400, "bad_schema",
        E("bad_schema", "hostile-admin"))
    add("cmd: throttle 150 %", "POST", COMMANDS, cmd_h(), good(args={"throttle_pct": "150"}), 400, "bad_args",
        E("bad_args", "hostile-admin"))
    add("cmd: throttle without args", "POST", COMMANDS, cmd_h(), good(args={}), 400, "bad_args",
        E("bad_args", "hostile-admin"))
    payload = strip_signature(good(args={"throttle_pct": "20"}))
    entry = record(1, b"throttle_pct") + record(2, b"21")
    add("cmd: args key twice, signed", "POST", COMMANDS, cmd_h(), sign_raw(k, payload + record(4, entry)), 400,
        "malformed", E("malformed", "hostile-admin"))
    payload = strip_signature(good(action="start", args={}))
    add("cmd: module twice, signed", "POST", COMMANDS, cmd_h(), sign_raw(k, payload + bytes([0x10, 0x01])), 400,
        "malformed", E("malformed", "hostile-admin"))
    payload = strip_signature(good(action="start", args={}))
    add("cmd: request_id as a varint, signed", "POST", COMMANDS, cmd_h(), sign_raw(k, payload + bytes([0x28, 0x01])),
        400, "malformed", E("malformed", "hostile-admin"))
    add("cmd: key out of scope (issuer)", "POST", COMMANDS, cmd_h(), good(issuer="mallory"), 403, "key_scope",
        E("key_scope", "hostile-admin"))
    # Request ids name the command in every row and answer: bounded, visible.
    add("cmd: request id of 129 bytes", "POST", COMMANDS, cmd_h(), good(request_id="r" * 129), 400,
        "malformed", E("malformed", "hostile-admin"))
    add("cmd: request id with a control character", "POST", COMMANDS, cmd_h(), good(request_id="req\x1b[2J"),
        400, "malformed", E("malformed", "hostile-admin"))
    # A refused body's names are kept bounded in its row (checked below for every row).
    add("cmd: a 60 KB request id, forged signature", "POST", COMMANDS, cmd_h(),
        flip_sig(good(request_id="r" * 60000)), 401, "bad_signature", E("bad_signature", "hostile-admin"))
    add("cmd: unknown module value", "POST", COMMANDS, cmd_h(), good(module=42, action="start", args={}), 400,
        "malformed", E("malformed", "hostile-admin"))
    add("cmd: text/plain", "POST", COMMANDS, [auth(admin), ("content-type", "text/plain")], good(), 415,
        "unsupported_media_type", E("unsupported_media_type", "hostile-admin"))
    add("cmd: JSON media type on the command endpoint", "POST", COMMANDS, json_h(), good(), 415,
        "unsupported_media_type", E("unsupported_media_type", "hostile-admin"))
    add("cmd: GET on the command endpoint", "GET", COMMANDS, [auth(admin)], b"", 405, "method_not_allowed",
        E("method_not_allowed"), why="refused before the token is read: no requester")
    add("cmd: PUT on the command endpoint", "PUT", COMMANDS, cmd_h(), good(), 405, "method_not_allowed",
        E("method_not_allowed"), why="refused before the token is read: no requester")

    # Scope and route mismatches.
    add("route: arbitrage command on mev's route", "POST", "/api/control/module/mev:start", cmd_h(),
        good(module="arbitrage", action="start", args={}), 403, "route_mismatch",
        E("route_mismatch", "hostile-admin"))
    add("route: stop command on a start route", "POST", "/api/control/module/mev:start", cmd_h(),
        good(action="stop", args={}), 403, "route_mismatch", E("route_mismatch", "hostile-admin"))
    add("route: unknown action", "POST", "/api/control/module/mev:launch", json_h(), b"{}", 400, "malformed",
        E("malformed", "hostile-admin"))
    add("route: unknown module", "POST", "/api/control/module/dex:start", json_h(), b"{}", 400, "malformed",
        E("malformed", "hostile-admin"))
    add("route: JSON throttle out of range", "POST", "/api/control/module/mev:throttle", json_h(),
        b'{"throttle_pct": 500, "hostile": "%s"}' % uuid.uuid4().hex.encode(), 400, "malformed",
        S("malformed"), marker_in_path=False, why="unknown field refused first")
    add("route: JSON throttle 101", "POST", "/api/control/module/mev:throttle", json_h(),
        b'{"throttle_pct": 101, "ev_min": 0.%d}' % (k.next_nonce() % 10**9), 400, "bad_args", S("bad_args"),
        marker_in_path=False)
    add("route: JSON not JSON", "POST", "/api/control/module/mev:throttle", json_h(),
        b"{throttle_pct: %d" % k.next_nonce(), 400, "malformed", S("malformed"), marker_in_path=False)
    add("route: protobuf sent as JSON", "POST", "/api/control/module/mev:throttle", json_h(), good(), 400,
        "malformed", S("malformed"), marker_in_path=False)
    add("route: kill on a throttle route", "POST", "/api/control/module/mev:throttle", json_h(),
        b'{"kill": true, "ev_min": 0.%d}' % (k.next_nonce() % 10**9), 400, "bad_args", S("bad_args"),
        marker_in_path=False)
    add("route: JSON route as text/plain", "POST", "/api/control/module/mev:throttle",
        [auth(admin), ("content-type", "text/plain")], b'{"throttle_pct": %d}' % (k.next_nonce() % 100), 415,
        "unsupported_media_type", S("unsupported_media_type"), marker_in_path=False)
    add("route: viewer on a JSON route", "POST", "/api/control/module/mev:throttle", json_h(viewer),
        b'{"throttle_pct": 50}', 403, "forbidden_role", E("forbidden_role", "hostile-viewer"))

    # The data plane's refusals are rows too, naming the token's holder.
    add("data plane: JSON-RPC that is not JSON", "POST", "/api/rpc", json_h(operator),
        b'{"jsonrpc": "2.0", "hostile": "%s"' % uuid.uuid4().hex.encode(), 200, None,
        S("malformed", "hostile-operator"), marker_in_path=False, why="JSON-RPC answers 200 with its error")
    add("data plane: opportunities that are not JSON", "POST", "/api/opportunities", json_h(operator),
        b'{"opportunities": ["%s"' % uuid.uuid4().hex.encode(), 400, "malformed",
        S("malformed", "hostile-operator"), marker_in_path=False)

    # The reads and the models' scoring: their refusals are rows too.
    add("ledger: a cursor that is none", "GET",
        "/api/ledger/request/%s?after=bogus" % uuid.uuid4().hex, [auth(viewer)], b"", 400, "malformed",
        S("malformed", "hostile-viewer"), marker_in_path=False)
    add("models: a predict body that is not JSON", "POST", "/api/models/mev/predict", json_h(operator),
        b'{"rows": [["%s"' % uuid.uuid4().hex.encode(), 400, "malformed",
        S("malformed", "hostile-operator"), marker_in_path=False)

    # Header spoofing: what the client says it is counts for nothing.
    spoof = [("x-gw-verified", "1"), ("x-gw-sub", "mallory"), ("x-gw-roles", "admin"),
             ("x-gw-pubkey-id", "op-admin-1"), ("x-gw-issuer", "dashboard"), ("x-gw-token-issuer", "evil")]
    add("spoof: stamped headers without a token", "POST", COMMANDS, spoof + [("content-type", PB)], good(), 401,
        "jwt_missing", E("jwt_missing"))
    add("spoof: admin roles header, viewer token", "POST", "/api/control/module/mev:throttle",
        spoof + json_h(viewer), b'{"throttle_pct": 40}', 403, "forbidden_role",
        E("forbidden_role", "hostile-viewer"))
    add("spoof: a ticket header", "POST", COMMANDS, [("x-gw-ticket", "0" * 32)] + cmd_h(viewer), good(), 403,
        "forbidden_role", E("forbidden_role", "hostile-viewer"))
    add("spoof: another sub, admin token, bad command", "POST", COMMANDS, spoof + cmd_h(), good()[:-3], 400,
        "malformed", E("malformed", "hostile-admin"))
    add("spoof: another sub, admin token, JSON applied as the real sub", "POST",
        "/api/control/module/mev:throttle", spoof + json_h(), b'{"throttle_pct": 100, "ev_min": 0.%d}'
        % (k.next_nonce() % 10**9), 200, None, ("edge", "accepted", "", "hostile-admin"), marker_in_path=False,
        why="the row names the verified sub, not the header's")
    add("spoof: forwarded-client-cert", "POST", COMMANDS,
        [("x-forwarded-client-cert", 'By=spiffe://x;Subject="CN=envoy.local"')] + cmd_h(viewer), good(), 403,
        "forbidden_role", E("forbidden_role", "hostile-viewer"))

    add("spoof: Envoy's own headers (a 1 ms upstream timeout, retries)", "GET", "/api/ledger/history?limit=5",
        [auth(viewer), ("x-envoy-upstream-rq-timeout-ms", "1"), ("x-envoy-retry-on", "5xx"),
         ("x-envoy-max-retries", "5")], b"", 200, None, None,
        why="a client is never internal to Envoy (its address, loopback included): x-envoy-* headers it "
            "sends are stripped, not obeyed (obeyed, the 1 ms timeout answers 504)")

    # Path tricks: no spelling of a control route skips the checks.
    bad_sig = lambda: flip_sig(good())
    add("path: dot segments", "POST", "/api/x/../control/commands", cmd_h(), bad_sig(), 401, "bad_signature",
        E("bad_signature", "hostile-admin"))
    add("path: doubled slashes", "POST", "//api//control//commands", cmd_h(), bad_sig(), 401, "bad_signature",
        E("bad_signature", "hostile-admin"))
    add("path: query string", "POST", COMMANDS + "?debug=1", cmd_h(), bad_sig(), 401, "bad_signature",
        E("bad_signature", "hostile-admin"))
    add("path: trailing slash", "POST", COMMANDS + "/", cmd_h(), bad_sig(), 404, "not_found",
        ("sidecar", "rejected", "not_found", "hostile-admin"), marker_in_path=False,
        why="not the command route: an operator route, and the sidecar has no such path "
            "(its row names the token holder the edge verified)")
    add("path: encoded slash", "POST", "/api/control%2Fcommands", cmd_h(), bad_sig(), 400, None, None,
        why="Envoy refuses escaped slashes before any filter (path_with_escaped_slashes_action)")
    add("path: upper case, viewer", "POST", "/API/control/commands", cmd_h(viewer), good(), 404, "not_found", None,
        why="a public path that is none of the console's assets: Envoy answers 404 itself (no upstream, no row)")
    add("path: module route with dot segments", "POST", "/api/control/module/../module/mev:start", cmd_h(),
        good(module="arbitrage", action="start", args={}), 403, "route_mismatch",
        E("route_mismatch", "hostile-admin"))
    add("public: a console asset with a body past the buffer's limit", "GET", "/console.js", [],
        b"b" * (1536 * 1024), 200, None, None,
        why="public routes do not buffer bodies (anyone could hold 1 MiB per stream in Envoy); "
            "buffered, Envoy answered 413")
    add("path: internal route through the edge", "POST", "/internal/edge-decisions",
        [("content-type", "application/json")], b"[]", 404, "not_found", None,
        why="/internal is never routed to the sidecar: Envoy answers 404 itself")
    return cases


def flip_sig(body):
    """The same command with one bit of its signature flipped."""
    c = pb.Command()
    c.ParseFromString(body)
    sig = bytearray(c.sig)
    sig[5] ^= 1
    c.sig = bytes(sig)
    return c.SerializeToString(deterministic=True)


def resend_cases(k):
    """A replay: the same bytes again (the sidecar says already accepted), and the
    same nonce in other bytes (the edge refuses). Sent after their originals."""
    admin = k.token("hostile-admin")
    h = [("authorization", f"Bearer {admin}"), ("content-type", PB)]
    nonce = k.next_nonce()
    first = k.command(action="throttle", args={"throttle_pct": "100"}, nonce=nonce)
    other = k.command(action="throttle", args={"throttle_pct": "99"}, nonce=nonce)
    return [
        Case("replay: original", "POST", COMMANDS, h, first, 200, None, ("sidecar", "accepted", "", "hostile-admin"),
             marker_in_path=False),
        Case("replay: the same bytes again", "POST", COMMANDS, h, first, 409, "replay",
             ("sidecar", "rejected", "replay", "hostile-admin"), marker_in_path=False, why="second sidecar row"),
        Case("replay: the nonce in other bytes", "POST", COMMANDS, h, other, 409, "replay",
             ("edge", "rejected", "replay", "hostile-admin")),
    ]


def sidecar_cases(k, run):
    """Straight to the sidecar, around Envoy: only Envoy's certificate gets in."""
    other = (f"{run}/certs/other-client.pem", f"{run}/certs/other-client.key")
    forged_report = json.dumps([{"decision": "rejected", "code": "replay", "path": COMMANDS,
                                 "raw_hex": uuid.uuid4().hex, "ts_ms": int(time.time() * 1000)}]).encode()
    spoof = [("x-gw-verified", "1"), ("x-gw-sub", "mallory"), ("x-gw-roles", "admin")]
    cases = []
    for label, cert, status, code in (("no certificate", None, 401, "unauthenticated"),
                                      ("another client certificate", other, 403, "forbidden_peer")):
        for what, method, path, headers, body in (
                ("a command", "POST", COMMANDS, [("content-type", PB)], k.command()),
                ("the JSON signing route", "POST", "/api/control/module/mev:stop",
                 spoof + [("content-type", "application/json")], b'{"n": "%s"}' % uuid.uuid4().hex.encode()),
                ("a forged edge report", "POST", "/internal/edge-decisions",
                 [("content-type", "application/json")], forged_report),
                ("module state", "GET", "/api/modules", spoof, b""),
                ("the ledger", "GET", "/api/ledger/history", [], b""),
                ("JSON-RPC", "POST", "/api/rpc", [("content-type", "application/json")],
                 b'{"jsonrpc":"2.0","id":1,"method":"getHealth","n":"%s"}' % uuid.uuid4().hex.encode()),
                ("metrics on the API port", "GET", "/metrics", [], b""),
        ):
            c = Case(f"direct, {label}: {what}", method, path, headers, body, status, code,
                     ("sidecar", "rejected", code, ""), marker_in_path=False)
            c.cert = cert
            cases.append(c)
    # Envoy's own certificate (an Envoy whose chain lost the filter, or anyone else
    # holding that certificate): a stamp or a report batch without the edge key's
    # seal is not believed.
    envoy = (f"{run}/certs/envoy-client.pem", f"{run}/certs/envoy-client.key")
    # An identity the sidecar would believe, were it sealed.
    spoof = [("x-gw-verified", "jwt"), ("x-gw-sub", "mallory"), ("x-gw-roles", "admin")]
    for what, method, path, headers, body in (
            ("the JSON signing route as mallory", "POST", "/api/control/module/mev:stop",
             spoof + [("content-type", "application/json")], b'{"n": "%s"}' % uuid.uuid4().hex.encode()),
            ("module state as mallory", "GET", "/api/modules", spoof, b""),
            ("a forged seal", "GET", "/api/ledger/history",
             spoof + [("x-gw-stamp", f"v2.{int(time.time())}.{uuid.uuid4().hex}.{'ab' * 32}")], b""),
            ("a forged edge report", "POST", "/internal/edge-decisions",
             [("content-type", "application/json")], forged_report),
    ):
        c = Case(f"direct, Envoy's certificate, no seal: {what}", method, path, headers, body, 401,
                 "edge_stamp_invalid", ("sidecar", "rejected", "edge_stamp_invalid", ""), marker_in_path=False)
        c.cert = envoy
        cases.append(c)
    return cases


# --- running and checking -----------------------------------------------------------

def ch_query(k, sql):
    req = urllib.request.Request(CLICKHOUSE, sql.encode(),
                                 {"X-ClickHouse-User": "gw_admin", "X-ClickHouse-Key": k.ch_admin})
    return urllib.request.urlopen(req, timeout=30).read().decode()


def error_code(body):
    try:
        return json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None


def check(results, rows):
    """Each result against its case: failures (text), and whether a row is missing."""
    failures = []
    missing = False
    used = set()
    for c, t, status, body, marker in results:
        problems = []
        if status != c.status:
            problems.append(f"status {status}, want {c.status}")
        code = error_code(body)
        if c.code is not None and code != c.code:
            problems.append(f"code {code!r}, want {c.code!r}")
        if c.audit is not None:
            stage, decision, acode, who = c.audit
            raw = c.body.hex()
            match = None
            for i, r in enumerate(rows):
                if i in used or (r["stage"], r["decision"], r["code"]) != (stage, decision, acode):
                    continue
                by_marker = marker is not None and r["route"].endswith(marker)
                by_body = marker is None and (r["raw_hex"] == raw
                                              or (raw == "" and r["route"] == route_of(c.path)))
                if by_marker or by_body:
                    match = i
                    break
            if match is None:
                missing = True
                problems.append(f"no ledger row ({stage}, {decision}, {acode}) for it")
            else:
                used.add(match)
                if rows[match]["requester"] != who:
                    problems.append(f"row requester {rows[match]['requester']!r}, want {who!r}")
        if problems:
            failures.append(f"[{t}] {c.name}: " + "; ".join(problems)
                            + f"\n      body: {body[:300]!r}")
    return failures, missing


def run(args):
    k = Keys(args.run)
    results = []  # (case, transport, status, body, marker)
    cases = [(c, t) for t in ("h3", "h2") for c in edge_cases(k)]
    cases += [(c, t) for t in ("h3", "h2") for c in resend_cases(k)]
    direct = sidecar_cases(k, args.run)
    if args.only:
        cases = [(c, t) for c, t in cases if args.only in c.name]
        direct = [c for c in direct if args.only in c.name]
    if args.list:
        for c, t in cases:
            print(f"{t}  {c.name}")
        for c in direct:
            print(f"tls  {c.name}")
        return 0
    started_ms = int(time.time() * 1000)
    h3, h2c = H3(k.ca), H2(GATEWAY, k.ca)
    try:
        for i, (c, t) in enumerate(cases):
            marker = f"hc={t}-{i}-{os.getpid()}"
            path = c.path + (("&" if "?" in c.path else "?") + marker if c.marker_in_path else "")
            try:
                status, body = (h3 if t == "h3" else h2c).request(c.method, path, c.headers, c.body)
            except (ConnectionError, OSError, asyncio.TimeoutError) as e:
                status, body = -1, str(e).encode()
                if t == "h2":
                    h2c.close()
                    h2c = H2(GATEWAY, k.ca)
            # Found by its query's digest (the path as Envoy normalised it before).
            digest = "?" + route_of(path).split("?", 1)[1] if c.marker_in_path else None
            results.append((c, t, status, body, digest))
    finally:
        h3.close()
        h2c.close()
    for c in direct:
        try:
            conn = H2(SIDECAR, k.ca, cert=c.cert, authority="localhost:8080")
            status, body = conn.request(c.method, c.path, c.headers, c.body)
            conn.close()
        except (ConnectionError, OSError, ssl.SSLError) as e:
            status, body = -1, str(e).encode()
        results.append((c, "tls", status, body, None))

    # The rows: wait for the edge's reports and the sidecar's shipper.
    deadline = time.time() + 30
    while True:
        out = ch_query(k, "SELECT stage, decision, code, requester, route, raw_hex FROM control_decisions "
                          f"WHERE ts_ms >= {started_ms - 1000} FORMAT JSONEachRow")
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        failures, missing = check(results, rows)
        if not missing or time.time() > deadline:
            break
        time.sleep(0.5)
    # Whatever a request said, a row keeps at most 256 bytes of each name it gave
    # and 512 of who asked and the route (its raw_hex keeps the request whole).
    out = ch_query(k, "SELECT max(length(request_id)), max(length(issuer)), max(length(pubkey_id)), "
                      "max(length(requester)), max(length(route)) FROM control_decisions "
                      f"WHERE ts_ms >= {started_ms - 1000} FORMAT TSV")
    longest = [int(v) for v in out.split()]
    if len(longest) != 5 or max(longest[:3]) > 256 or max(longest[3:]) > 512:
        failures.append(f"a row keeps too long a name (request id, issuer, key id, requester, route): {longest}")
    n = len(results)
    if failures:
        print(f"hostile: {len(failures)} of {n} cases failed:")
        for f in failures:
            print("  " + f)
        return 1
    audited = sum(1 for c, *_ in results if c.audit is not None)
    print(f"hostile: {n} cases held (HTTP/3 and HTTP/2 through Envoy, TLS straight to the sidecar); "
          f"{audited} ledger rows checked")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=os.path.join(ROOT, ".run"), help="the local gateway's .run directory")
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    sys.exit(run(a))


if __name__ == "__main__":
    main()
