#!/usr/bin/env python3
"""Edge throughput and latency: one Envoy process, one load generator (h2load, HTTP/2
over TLS), a direct response (no upstream), one listener per filter chain:

  none            router only
  jwt_authn       Envoy's native envoy.filters.http.jwt_authn (HS256, local JWKS)
  wasm_floor      the cost of any proxy-wasm filter here: one wasm context that reads one
                  header and continues (gw_edge's stamp stage alone)
  gw_jwt          gw_edge (verify + buffer stages; the stamp stage runs on control routes
                  only, as in envoy/envoy.yaml.tmpl), JWT-only route
  gw_jwt_post     the signed command's bytes POSTed to that JWT-only route (the same
                  request on the wire and through the buffer filter, no command check)
  gw_command      gw_edge, signed command on /api/control/commands
  gw_unknown_key  the same command under an unknown pubkey_id (no signature math)

Prints req/s, p50/p99 latency and ratios under load, then latency one request at a
time; both in interleaved rounds, so every variant sees the same drift of the machine. The
signed-command load repeats one body, so after the first request every response is
409 replay: each one still runs the whole verification (wire scan, Ed25519, scope,
freshness, shared-data read) first. A last phase sends accepted commands one at a
time (fresh signed bodies, so the accept path runs: two shared-data writes and the
stamp stage too) through a small HTTP/1.1 client, each back to back with the same
bytes on the JWT-only route, so both see the same moments of the machine, and with
a second, identical JWT-only stream whose difference from the first is the noise floor.
That phase is timed twice: at the client, and by Envoy itself (its access log's
microsecond durations from the request's first byte to the response's last, and from
the request's last byte to the response's first), which leaves out the client, its
TLS and the loopback, and with them most of this kind of machine's noise.

--accepted-only runs that phase alone. --wasm-b FILE adds a second build of the
filter (in its own VM, on its own listener) whose accepted commands take the control
stream's place: an A/B of two builds at the same moments of the machine.

The signed command's extra cost (gw_command - gw_jwt_post, one request at a time:
what checking the command adds to the same request) is compared with one native
Ed25519 verify timed in the same run (--native-verify); gw_command - gw_jwt is printed
too (it also counts the body's upload and buffering).

With --pin, Envoy runs one worker on CPU 0 and h2load runs on CPU 1 (the native verify
on CPU 0 too), so the two stop competing for a core.

Usage: bench/edge.py --envoy BIN --wasm FILE --gwctl BIN [--native-verify BIN] [--pin]
                     [--seconds 15] [--clients 16] [--rounds 5] [--serial-rounds 10]
                     [--serial-seconds 1] [--accepted-rounds 10] [--accepted-per-round 400]
                     [--accepted-only] [--wasm-b FILE] [--keep]
"""
import argparse
import base64
import collections
import concurrent.futures
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Envoy's own timing of a request, in µs: from its first byte received to the last
# byte of the response written (the whole server side), and from the request's last
# byte to the response's first (the filter chain after the body), tagged with the
# client's stream.
SERVER_LOG_FORMAT = ("%REQ(X-BENCH-STREAM)% %RESPONSE_CODE% %COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)% "
                     "%COMMON_DURATION(DS_RX_END:DS_TX_BEG:us)%\n")


def listener(port, cert, key, filters, no_stamp_outside=None, access_log=None):
    """A TLS listener answering 200 "ok" after `filters`. With `no_stamp_outside` (a
    path), the gw_edge_stamp filter runs only on that path, as envoy/envoy.yaml.tmpl
    runs it only on the control routes. With `access_log` (a file), every request's
    server-side timing is written there (SERVER_LOG_FORMAT)."""
    ok = {"status": 200, "body": {"inline_string": "ok"}}
    routes = [{"match": {"prefix": "/"}, "direct_response": ok}]
    if no_stamp_outside:
        routes = [{"match": {"path": no_stamp_outside}, "direct_response": ok},
                  {"match": {"prefix": "/"}, "direct_response": ok, "typed_per_filter_config": {
                      "gw_edge_stamp": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                                        "disabled": True}}}]
    return {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["h2"], "tls_certificates": [
                    {"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}]}}},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "bench", "codec_type": "AUTO",
                "access_log": [] if not access_log else [{"name": "envoy.access_loggers.file", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log,
                    "log_format": {"text_format_source": {"inline_string": SERVER_LOG_FORMAT}}}}],
                "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
                "http_filters": filters + [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}


def wasm_filter(name, root_id, wasm, config, vm_id="gw_edge"):
    return {"name": name, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": name, "root_id": root_id, "fail_open": False,
                   "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8",
                                 "code": {"local": {"filename": wasm}}},
                   "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                     "value": json.dumps(config)}}}}


PIN = {"envoy": [], "client": []}  # taskset prefixes (--pin)


def run_envoy(envoy, cfg, admin, log, concurrency=2):
    p = subprocess.Popen(PIN["envoy"] + [envoy, "-c", cfg, "--concurrency", str(concurrency),
                                         "--disable-hot-restart", "-l", "warn",
                                         # access logs reach their file this often (server_times)
                                         "--file-flush-interval-msec", "200"],
                         stdout=log, stderr=log, start_new_session=True)
    for _ in range(300):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1).status == 200:
                return p
        except Exception:
            pass
        if p.poll() is not None:
            sys.exit(f"envoy exited; see {log.name}")
        time.sleep(0.1)
    sys.exit("envoy not ready")


def h2load(port, path, headers, data, seconds, clients, tmp, streams=4, warm_up=2):
    logf = os.path.join(tmp, "h2load.log")
    if os.path.exists(logf):
        os.remove(logf)
    cmd = PIN["client"] + ["h2load", "-t", "1", "-c", str(clients), "-m", str(streams), "--warm-up-time", str(warm_up), "-D", str(seconds),
           "--log-file", logf, f"https://127.0.0.1:{port}{path}"]
    for h in headers:
        cmd += ["-H", h]
    if data:
        cmd += ["-d", data]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lat, statuses = [], {}
    with open(logf) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                statuses[parts[1]] = statuses.get(parts[1], 0) + 1
                lat.append(int(parts[2]))
    rps = float([l for l in out.splitlines() if l.startswith("finished in")][0].split(",")[1].split()[0])
    return dict(summary(lat, statuses), rps=rps)


class Http1:
    """One keep-alive TLS connection (HTTP/1.1) that POSTs one body at a time."""

    def __init__(self, port, headers):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.s = ctx.wrap_socket(sock, server_hostname="localhost")
        self.head_lines = "".join(f"{h}\r\n" for h in headers)
        self.buf = b""

    def post(self, path, body):
        """(latency in µs, status)."""
        req = (f"POST {path} HTTP/1.1\r\nhost: localhost\r\n{self.head_lines}"
               f"content-length: {len(body)}\r\n\r\n").encode() + body
        t0 = time.perf_counter_ns()
        self.s.sendall(req)
        while b"\r\n\r\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk:
                sys.exit(f"connection closed by Envoy on {path}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head).group(1))
        while len(self.buf) < length:
            self.buf += self.s.recv(65536)
        self.buf = self.buf[length:]
        return (time.perf_counter_ns() - t0) // 1000, head.split(b" ", 2)[1].decode()

    def close(self):
        self.s.close()


def serial_streams(headers, streams, warm_up=0, seed=1):
    """Request streams interleaved one request at a time, each on its own
    connection: streams = [(port, path, bodies), ...] of equal length. Request i of
    every stream runs back to back with request i of the others, so all see the same
    moment of this machine, in a random order that never starts with the stream that
    ended the previous one: a request right after one of its own kind finds its code
    and data warm, and a fixed order (reversing or rotating) makes some stream follow
    a given other one more often than the rest do, which moved an A/A comparison by
    several µs. Stream j's requests carry `x-bench-stream: j` (Envoy's access log
    tells them apart by it). Returns one list of (latency µs, status) per stream, the
    first `warm_up` rounds dropped. h2load repeats one body; this sends distinct ones,
    so signed commands can be accepted rather than refused as replays."""
    conns = [Http1(port, headers + [f"x-bench-stream: {j}"]) for j, (port, _, _) in enumerate(streams)]
    out = [[] for _ in streams]
    n = len(streams)
    rng = random.Random(seed)
    order, last = list(range(n)), None
    try:
        for i in range(min(len(b) for _, _, b in streams)):
            rng.shuffle(order)
            while n > 1 and order[0] == last:
                rng.shuffle(order)
            last = order[-1]
            for j in order:
                r = conns[j].post(streams[j][1], streams[j][2][i])
                if i >= warm_up:
                    out[j].append(r)
    finally:
        for c in conns:
            c.close()
    return out


def server_times(log_path, streams, chunk, warm_up):
    """Envoy's timings from the access log (SERVER_LOG_FORMAT), per stream: a list of
    (whole server side µs, after the body µs, status), the first `warm_up` of every
    `chunk` requests of a stream dropped, as serial_streams drops them."""
    seen = [[] for _ in range(streams)]
    with open(log_path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and parts[0].isdigit() and int(parts[0]) < streams:
                seen[int(parts[0])].append((int(parts[2]), int(parts[3]), parts[1]))
    return [[r for i, r in enumerate(s) if i % chunk >= warm_up] for s in seen]


def summary(lat, statuses):
    """p50/p99 in ms of latencies in µs."""
    lat = sorted(lat)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000.0
    return {"p50": pct(0.50), "p99": pct(0.99), "n": len(lat), "statuses": statuses, "lat": lat}


FLUSH_S = 0.5
ACCEPTED_WARM_UP = 20  # requests per run of accepted commands that are not timed


def check_buckets(admin):
    """The filter's gw_edge.command_check_us histogram, as Envoy's detailed buckets:
    {lower_bound: (width, count)}, cumulative up to the last stats flush — so wait
    for one first."""
    time.sleep(FLUSH_S * 1.5)
    url = f"http://127.0.0.1:{admin}/stats?format=json&histogram_buckets=detailed&filter=command_check_us"
    for st in json.loads(urllib.request.urlopen(url, timeout=5).read())["stats"]:
        for d in (st.get("histograms") or {}).get("details", []):
            if d["name"].endswith("gw_edge.command_check_us"):
                return {b["lower_bound"]: (b["width"], b["count"]) for b in d["totals"]}
    return {}


def add_bucket_diff(acc, before, after):
    for lb, (w, n) in after.items():
        d = n - before.get(lb, (w, 0))[1]
        if d > 0:
            acc[lb] = (w, acc.get(lb, (w, 0))[1] + d)


def bucket_quantiles(buckets, qs=(0.5, 0.99)):
    """Quantiles (bucket midpoints, µs) and the sample count."""
    n = sum(c for _, c in buckets.values())
    out, acc = {}, 0
    for lb in sorted(buckets):
        w, c = buckets[lb]
        acc += c
        for q in qs:
            if q not in out and n and acc >= q * n:
                out[q] = lb + w / 2
    return out, n


def report_load(results):
    base, native = results["none"], results["jwt_authn"]
    ratios = [g / j for g, j in zip(results["gw_jwt"]["rounds"], native["rounds"])]
    print(f"gw_jwt / jwt_authn per round: {', '.join(f'{x:.2f}' for x in ratios)} "
          f"(median {statistics.median(ratios):.2f}x; target at least 1.15x)")
    print("\n| chain | req/s | p50 ms | p99 ms | vs none | vs jwt_authn |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in results:
        r = results[name]
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['rps']/base['rps']:.3f}x | {r['rps']/native['rps']:.3f}x |")


def report_serial(a, serial, serial_runs):
    """Prints the one-at-a-time runs; returns what the (replayed) command adds, (p50, p99) µs."""
    print(f"\none request at a time (h2load -c1 -m1, {a.serial_rounds} interleaved rounds of {a.serial_seconds} s):")
    for name in serial:
        r = serial[name]
        print(f"  {name:14s} p50 {r['p50']*1000:7.0f} µs  p99 {r['p99']*1000:7.0f} µs  n {r['n']}  {r['statuses']}")
    # This machine has stretches of seconds where every latency is worse: pair the
    # variants within each round and take the median of the per-round differences.
    def paired(q, base):
        d = [(c[q] - j[q]) * 1000 for c, j in zip(serial_runs["gw_command"], serial_runs[base])]
        return statistics.median(d), d
    # Against the same bytes POSTed on a JWT-only route: what checking the command adds.
    extra, _ = paired("p50", "gw_jwt_post")
    extra99, d99 = paired("p99", "gw_jwt_post")
    print(f"signed command adds (gw_command - gw_jwt_post, serial, median of per-round differences): "
          f"p50 {extra:.0f} µs, p99 {extra99:.0f} µs")
    print(f"  per round, p99: {', '.join(f'{x:.0f}' for x in d99)}")
    get50, _ = paired("p50", "gw_jwt")
    get99, _ = paired("p99", "gw_jwt")
    print(f"  against a bodiless GET on the JWT route instead (gw_command - gw_jwt; adds the body's "
          f"upload and buffering): p50 {get50:.0f} µs, p99 {get99:.0f} µs")
    pooled = (serial["gw_command"]["p99"] - serial["gw_jwt_post"]["p99"]) * 1000
    print(f"  pooled over all rounds instead: p50 {(serial['gw_command']['p50'] - serial['gw_jwt_post']['p50']) * 1000:.0f} µs, "
          f"p99 {pooled:.0f} µs")
    sig = (serial["gw_command"]["p50"] - serial["gw_unknown_key"]["p50"]) * 1000
    print(f"  of which the signature (gw_command - gw_unknown_key, serial p50): {sig:.0f} µs")
    return extra, extra99


# What each stream of the accepted phase is, against the gw_jwt_post stream.
ACCEPTED_LABELS = {
    "gw_command_accepted": "accepted command",
    "gw_command_accepted_b": "accepted command, build B",
}


def report_accepted(a, accepted, server):
    """Prints the accepted-commands phase, from the client and from Envoy's access log;
    returns what each stream adds over gw_jwt_post, {what: (p50, p99)} µs."""
    print(f"\naccepted commands, one at a time ({a.accepted_rounds} rounds of {a.accepted_per_round}: "
          f"each a fresh signed command, back to back with the same bytes on the JWT-only route, "
          f"{len(accepted)} HTTP/1.1 connections, in a random order every request):")
    pooled = {}
    for name, runs in accepted.items():
        st = dict(collections.Counter(code for r in runs for _, code in r))
        pooled[name] = summary([us for r in runs for us, _ in r], st)
        print(f"  {name:22s} p50 {pooled[name]['p50']*1000:7.0f} µs  p99 {pooled[name]['p99']*1000:7.0f} µs  "
              f"n {pooled[name]['n']}  {pooled[name]['statuses']}")
    def diff(d, name, q):
        return (d[name][q] - d["gw_jwt_post"][q]) * 1000
    out = {}
    for name in accepted:
        if name != "gw_jwt_post":
            if name != "gw_jwt_post_control":
                out[f"{ACCEPTED_LABELS[name]}, at the client"] = (diff(pooled, name, "p50"), diff(pooled, name, "p99"))
            print(f"  {name} - gw_jwt_post: p50 {diff(pooled, name, 'p50'):.0f} µs, p99 {diff(pooled, name, 'p99'):.0f} µs")
    per_round = [(summary([us for us, _ in c], {})["p99"] - summary([us for us, _ in j], {})["p99"]) * 1000
                 for c, j in zip(accepted["gw_command_accepted"], accepted["gw_jwt_post"])]
    print(f"  gw_command_accepted - gw_jwt_post per round, p99: {', '.join(f'{x:.0f}' for x in per_round)}")
    pairs = [c[0] - j[0] for cr, jr in zip(accepted["gw_command_accepted"], accepted["gw_jwt_post"])
             for c, j in zip(cr, jr)]
    print(f"  per pair (the two requests back to back): median {statistics.median(pairs):.0f} µs")
    # The same requests as Envoy timed them: without the client, its TLS and the
    # loopback, so with far less of this machine's noise.
    print("the same requests as Envoy timed them (first byte in to last byte out | last byte in to first byte out):")
    whole, after = {}, {}
    for name, rows in server.items():
        whole[name] = summary([w for w, _, _ in rows], dict(collections.Counter(c for _, _, c in rows)))
        after[name] = summary([b for _, b, _ in rows], {})
        print(f"  {name:22s} p50 {whole[name]['p50']*1000:5.0f} | {after[name]['p50']*1000:5.0f} µs  "
              f"p99 {whole[name]['p99']*1000:5.0f} | {after[name]['p99']*1000:5.0f} µs  "
              f"n {whole[name]['n']}  {whole[name]['statuses']}")
    for name in whole:
        if name != "gw_jwt_post":
            print(f"  {name} - gw_jwt_post: p50 {diff(whole, name, 'p50'):.0f} | {diff(after, name, 'p50'):.0f} µs, "
                  f"p99 {diff(whole, name, 'p99'):.0f} | {diff(after, name, 'p99'):.0f} µs")
            if name != "gw_jwt_post_control":  # the noise floor, not a cost
                out[f"{ACCEPTED_LABELS[name]}, as Envoy times it"] = (diff(whole, name, "p50"), diff(whole, name, "p99"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--wasm", required=True)
    ap.add_argument("--gwctl", required=True)
    ap.add_argument("--seconds", type=int, default=15, help="per variant under load, split over the rounds")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the load runs")
    ap.add_argument("--serial-rounds", type=int, default=10, help="interleaved rounds of the one-at-a-time runs")
    ap.add_argument("--serial-seconds", type=int, default=1, help="per variant and round, one at a time")
    ap.add_argument("--accepted-rounds", type=int, default=10, help="rounds of accepted commands, one at a time")
    ap.add_argument("--accepted-per-round", type=int, default=400, help="fresh signed commands per round")
    ap.add_argument("--accepted-only", action="store_true",
                    help="only the accepted-commands phase (no load or one-at-a-time h2load runs)")
    ap.add_argument("--wasm-b", help="a second build of the filter (its own VM) for an A/B of accepted commands: "
                    "its commands replace the control stream")
    ap.add_argument("--keep", action="store_true", help="keep the working directory")
    ap.add_argument("--pin", action="store_true",
                    help="Envoy (one worker) on CPU 0, the load generator on CPU 1: less scheduling noise in the latencies")
    ap.add_argument("--native-verify", help="bench's native_verify example: one native Ed25519 verify, timed")
    a = ap.parse_args()
    if a.pin:
        PIN["envoy"], PIN["client"] = ["taskset", "-c", "0"], ["taskset", "-c", "1"]
    if not shutil.which("h2load"):
        sys.exit("h2load not found: apt-get install nghttp2-client")

    tmp = tempfile.mkdtemp(prefix="gw-bench-edge-")
    subprocess.run(["bash", os.path.join(ROOT, "envoy/gen-dev-certs.sh"), tmp + "/certs"], check=True, capture_output=True)
    cert, key = tmp + "/certs/server.pem", tmp + "/certs/server.key"
    subprocess.run([a.gwctl, "keygen", "--id", "op-admin-1", "--out", tmp + "/keys"], check=True, capture_output=True)
    secret = os.urandom(32)
    token = subprocess.run([a.gwctl, "jwt", "--secret-hex", secret.hex(), "--sub", "bench", "--role", "admin",
                            "--ttl", "1h", "--kid", "dev"], check=True, capture_output=True, text=True).stdout.strip()
    cmd = {"op-admin-1": tmp + "/cmd-ok.bin", "op-unknown": tmp + "/cmd-unknown.bin"}

    def sign_one(key_id, out, nonce=None):
        """One throttle command signed with op-admin-1's key under `key_id`."""
        subprocess.run([a.gwctl, "sign", "--key", tmp + "/keys/op-admin-1.sk.hex", "--key-id", key_id,
                        "--module", "mev", "--action", "throttle", "--arg", "throttle_pct=40",
                        "--issuer", "dashboard", "--out", out, "--force"]
                       + ([] if nonce is None else ["--nonce", str(nonce)]), check=True, capture_output=True)

    def sign():
        # Signed just before each run: commands are fresh for max_skew_secs (30 s).
        for key_id, out in cmd.items():
            sign_one(key_id, out)

    def sign_many(n):
        """n fresh commands with increasing nonces (each accepted once)."""
        base = time.time_ns()
        outs = [f"{tmp}/acc-{i}.bin" for i in range(n)]
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda i: sign_one("op-admin-1", outs[i], base + i), range(n)))
        bodies = []
        for o in outs:
            with open(o, "rb") as f:
                bodies.append(f.read())
        return bodies

    k = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
    gw_cfg = json.load(open(os.path.join(ROOT, "filter-wasm/config.example.json")))
    gw_cfg["command_keys"]["keys"][0]["public_key_hex"] = open(tmp + "/keys/op-admin-1.pk.hex").read().strip()
    gw_cfg["jwt"]["jwks"]["keys"][0]["k"] = k
    gw_cfg["edge_key_hex"] = os.urandom(32).hex()
    # No ledger here: reporting rejected commands to a missing cluster would measure
    # its failure path (serialise, fail, log) rather than the request path.
    gw_cfg.pop("report", None)
    def edge_chain(wasm, vm_id):
        """As envoy/envoy.yaml.tmpl chains the filter: verify stage, buffer, stamp stage."""
        return [wasm_filter("gw_edge", "gw_edge", wasm, gw_cfg, vm_id),
                {"name": "envoy.filters.http.buffer", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                    "max_request_bytes": 1048576}},
                wasm_filter("gw_edge_stamp", "gw_edge_stamp", wasm, {"stage": "stamp"}, vm_id)]
    gw_chain = edge_chain(a.wasm, "gw_edge")
    jwt_authn = [{"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"dev": {"issuer": "defi-dashboard", "audiences": ["defi-users"],
                              "local_jwks": {"inline_string": json.dumps({"keys": [{"kty": "oct", "kid": "dev", "alg": "HS256", "k": k}]})}}},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "dev"}}]}}]
    auth = f"authorization: Bearer {token}"
    proto = "content-type: application/x-protobuf"
    # One Envoy, one listener per filter chain: every variant meets the same process.
    # The proxy-wasm floor: one wasm context per request that reads one header and
    # continues (our stamp stage alone, with no ticket to swap).
    floor = [wasm_filter("gw_edge_stamp", "gw_edge_stamp", a.wasm, {"stage": "stamp"})]
    # gw_timed: the gw chain again, on a listener whose access log records Envoy's own
    # timing of every request (only the accepted phase uses it, so the load runs do
    # not pay for the log).
    chains = {"none": [], "jwt_authn": jwt_authn, "wasm_floor": floor, "gw": gw_chain, "gw_timed": gw_chain}
    if a.wasm_b:  # its own VM, so its own replay state: the same commands are fresh there
        chains["gw_b_timed"] = edge_chain(a.wasm_b, "gw_edge_b")
    server_log = f"{tmp}/server-times.log"
    ports = {name: free_port() for name in chains}
    variants = [  # name, chain, path, headers, body
        ("none", "none", "/api/modules", [], None),
        ("jwt_authn", "jwt_authn", "/api/modules", [auth], None),
        ("wasm_floor", "wasm_floor", "/api/modules", [auth], None),
        ("gw_jwt", "gw", "/api/modules", [auth], None),
        # The signed command's bytes POSTed to a JWT-only route: the same request on the
        # wire and through the buffer filter, without the command check.
        ("gw_jwt_post", "gw", "/api/modules", [auth, proto], cmd["op-admin-1"]),
        ("gw_command", "gw", "/api/control/commands", [auth, proto], cmd["op-admin-1"]),
        # The same command under an unknown pubkey_id: everything but the signature math (401).
        ("gw_unknown_key", "gw", "/api/control/commands", [auth, proto], cmd["op-unknown"]),
    ]
    admin = free_port()
    cfg = {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
           # Histograms reach the admin endpoint at each flush: flush often (see check_buckets).
           "stats_flush_interval": f"{FLUSH_S}s",
           "static_resources": {"listeners": [
               dict(listener(ports[n], cert, key, f, gw_cfg["command_path"] if n.startswith("gw") else None,
                             server_log if n.endswith("_timed") else None), name=n)
               for n, f in chains.items()]}}
    cfg_path = f"{tmp}/envoy.json"
    json.dump(cfg, open(cfg_path, "w"))
    results, serial, server = {}, {}, {}
    with open(f"{tmp}/envoy.log", "w") as log:
        p = run_envoy(a.envoy, cfg_path, admin, log, 1 if a.pin else 2)
        try:
            check = {"load": {}, "serial": {}, "accepted": {}}  # the filter's own timing of command bodies
            # Under load: the same interleaved rounds, so a drift of this machine hits
            # every variant alike; req/s is the mean over rounds.
            per_round = max(2, a.seconds // a.rounds)
            load_lat = {v[0]: [] for v in variants}
            load_status = {v[0]: {} for v in variants}
            load_rps = {v[0]: [] for v in variants}
            def run(phase, name, chain, path, headers, data, seconds, clients, streams):
                """One h2load run; the filter's check histogram around gw_command runs."""
                before = check_buckets(admin) if name == "gw_command" else None
                r = h2load(ports[chain], path, headers, data, seconds, clients, tmp, streams=streams, warm_up=1)
                if before is not None:
                    add_bucket_diff(check[phase], before, check_buckets(admin))
                return r

            load_rounds = 0 if a.accepted_only else a.rounds
            serial_rounds = 0 if a.accepted_only else a.serial_rounds
            for _ in range(load_rounds):
                sign()
                for name, chain, path, headers, data in variants:
                    r = run("load", name, chain, path, headers, data, per_round, a.clients, 4)
                    load_lat[name] += r["lat"]
                    load_rps[name].append(r["rps"])
                    for code, n in r["statuses"].items():
                        load_status[name][code] = load_status[name].get(code, 0) + n
            for name in (load_lat if load_rounds else ()):
                results[name] = dict(summary(load_lat[name], load_status[name]),
                                     rps=statistics.mean(load_rps[name]), rounds=load_rps[name])
                print(f"{name:14s} {results[name]['rps']:10.0f} req/s  p50 {results[name]['p50']:7.3f} ms  "
                      f"p99 {results[name]['p99']:7.3f} ms  statuses {results[name]['statuses']}", flush=True)
            # One request at a time (latency without queueing), in interleaved rounds so
            # every variant sees the same drift of this machine.
            lat = {v[0]: [] for v in variants}
            statuses = {v[0]: {} for v in variants}
            serial_runs = {v[0]: [] for v in variants}
            for _ in range(serial_rounds):
                sign()
                for name, chain, path, headers, data in variants:
                    r = run("serial", name, chain, path, headers, data, a.serial_seconds, 1, 1)
                    serial_runs[name].append(r)
                    lat[name] += r["lat"]
                    for code, n in r["statuses"].items():
                        statuses[name][code] = statuses[name].get(code, 0) + n
            serial = {name: summary(lat[name], statuses[name]) for name in (lat if serial_rounds else ())}
            # Accepted commands, one at a time: every body a fresh signed command, so the
            # filter's whole accept path runs (check, two shared-data writes, the stamp
            # stage). Each goes back to back with the same bytes POSTed on the JWT-only
            # route, twice: the second JWT-only stream is the control, its difference
            # from the first this set-up's noise floor. With --wasm-b, build B's commands
            # take the control's place.
            jwt_post = (ports["gw_timed"], "/api/modules")
            streams = {"gw_jwt_post": jwt_post, "gw_command_accepted": (ports["gw_timed"], gw_cfg["command_path"]),
                       "gw_jwt_post_control": jwt_post}
            if a.wasm_b:
                del streams["gw_jwt_post_control"]
                streams["gw_command_accepted_b"] = (ports["gw_b_timed"], gw_cfg["command_path"])
            accepted = {name: [] for name in streams}
            for rnd in range(a.accepted_rounds):
                bodies = sign_many(a.accepted_per_round + ACCEPTED_WARM_UP)
                time.sleep(0.5)  # let the signing processes' exit settle before timing
                before = check_buckets(admin)
                runs = serial_streams([auth, proto], [(port, path, bodies) for port, path in streams.values()],
                                      warm_up=ACCEPTED_WARM_UP, seed=rnd)
                add_bucket_diff(check["accepted"], before, check_buckets(admin))
                for name, r in zip(accepted, runs):
                    accepted[name].append(r)
            if a.accepted_rounds:
                time.sleep(1.0)  # Envoy writes its access logs every 0.2 s (--file-flush-interval-msec)
                server = dict(zip(accepted, server_times(server_log, len(accepted),
                                                          a.accepted_per_round + ACCEPTED_WARM_UP, ACCEPTED_WARM_UP)))
        finally:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait()

    extras = {}  # what a signed command adds, µs: what was compared -> (p50, p99)
    if results:
        report_load(results)
    if serial:
        extras["signed command (refused as a replay), one at a time"] = report_serial(a, serial, serial_runs)
    if accepted["gw_command_accepted"]:
        extras.update(report_accepted(a, accepted, server))
    # Inside the filter (V8, host clock): the time to check each command body
    # (wire scan, Ed25519 with the key's tables, scope, freshness, replay read).
    for phase in ("serial", "load", "accepted"):
        q, n = bucket_quantiles(check[phase])
        if n:
            print(f"command check inside the filter ({phase}, n {n}): p50 {q[0.5]:.0f} µs, p99 {q[0.99]:.0f} µs")
            extras[f"the filter's own check ({phase})"] = (q[0.5], q[0.99])
    if a.native_verify:
        # The baseline, measured now on the same machine: one native ed25519-dalek verify_strict.
        nv = json.loads(subprocess.run(PIN["envoy"] + [a.native_verify], check=True, capture_output=True, text=True).stdout)
        print(f"\none native Ed25519 verify_strict: p50 {nv['p50_us']:.1f} µs, p99 {nv['p99_us']:.1f} µs "
              f"(target: a signed command adds at most 3x one native verify at p99)")
        for what, (e50, e99) in extras.items():
            print(f"  {what}: at p99 {e99 / nv['p50_us']:.2f}x one native verify (p50), "
                  f"{e99 / nv['p99_us']:.2f}x its p99; at p50 {e50 / nv['p50_us']:.2f}x")
    if a.keep:
        print(f"kept {tmp} (Envoy's config and log, the access log of the accepted phase)")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
