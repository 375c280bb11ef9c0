"""The replay guard under concurrency, against the running local gateway: two
issuers sign 200 commands each from concurrent threads (nonces in nanoseconds, as
gwctl makes them), the 400 are shuffled and delivered over four HTTP/3 and four
HTTP/2 connections at once. Every one must be applied exactly once, whatever order
it arrived in; every resend is then 409; a command with nonce 2^64-1 is applied and
changes nothing for the commands that follow; the ledger holds one `applied` row per
command.

  replay_order.py --run .run [--per-issuer 200]
"""
import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hostile  # noqa: E402  (the transports, the signer, the keys)
from aioquic.asyncio import connect  # noqa: E402
from aioquic.h3.connection import H3_ALPN  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402

PB = hostile.PB
COMMANDS = hostile.COMMANDS
ISSUERS = ("dashboard", "gwctl")


def sign_all(k, per_issuer):
    """Signed concurrently: one thread per issuer, nonces from each thread's clock."""
    out = []
    lock = threading.Lock()

    def work(issuer):
        mine = []
        for _ in range(per_issuer):
            nonce = time.time_ns()
            body = k.command(module="arbitrage", action="throttle", args={"throttle_pct": "100"},
                             issuer=issuer, nonce=nonce, request_id=f"order-{uuid.uuid4()}")
            mine.append((issuer, nonce, body))
        with lock:
            out.extend(mine)

    threads = [threading.Thread(target=work, args=(i,)) for i in ISSUERS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


async def h3_send(k, bodies, headers):
    async def one_conn(share):
        cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
        cfg.load_verify_locations(k.ca)
        async with connect(hostile.GATEWAY[0], hostile.GATEWAY[1], configuration=cfg,
                           create_protocol=hostile.H3Client) as c:
            async def req(body):
                r = await c.request(f"localhost:{hostile.GATEWAY[1]}",
                                    {"method": "POST", "path": COMMANDS, "headers": headers,
                                     "body_hex": body.hex()})
                return int(r["headers"].get(":status", "0")), r["body"]
            # Eight streams at a time on each connection.
            results = []
            for i in range(0, len(share), 8):
                results += await asyncio.gather(*(req(b) for b in share[i:i + 8]))
            return results

    shares = [bodies[i::4] for i in range(4)]
    per = await asyncio.gather(*(one_conn(s) for s in shares))
    return [r for share in per for r in share], shares


def h2_send(k, bodies, headers):
    shares = [bodies[i::4] for i in range(4)]
    results = [None] * 4

    def work(i):
        conn = hostile.H2(hostile.GATEWAY, k.ca)
        results[i] = [conn.request("POST", COMMANDS, headers, b) for b in shares[i]]
        conn.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for share in results for r in share], shares


def deliver(k, bodies, headers):
    """Half over HTTP/3, half over HTTP/2, both at once; (body, status, answer)."""
    random.shuffle(bodies)
    h3_part, h2_part = bodies[::2], bodies[1::2]
    out = {}

    def run_h3():
        res, shares = asyncio.run(h3_send(k, h3_part, [list(h) for h in headers]))
        out["h3"] = list(zip([b for s in shares for b in s], res))

    t = threading.Thread(target=run_h3)
    t.start()
    res, shares = h2_send(k, h2_part, headers)
    out["h2"] = list(zip([b for s in shares for b in s], res))
    t.join()
    return [(b, s, body) for b, (s, body) in out["h3"] + out["h2"]]


def modules(k, token):
    conn = hostile.H2(hostile.GATEWAY, k.ca)
    status, body = conn.request("GET", "/api/modules", [("authorization", f"Bearer {token}")], b"")
    conn.close()
    assert status == 200, body
    return json.loads(body)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=os.path.join(hostile.ROOT, ".run"))
    ap.add_argument("--per-issuer", type=int, default=200)
    a = ap.parse_args()
    k = hostile.Keys(a.run)
    token = k.token("order-admin")
    headers = [("authorization", f"Bearer {token}"), ("content-type", PB)]
    failures = []

    before = modules(k, token)["arbitrage"]["applied"]
    signed = sign_all(k, a.per_issuer)
    t0 = time.time()
    first = deliver(k, [b for _, _, b in signed], headers)
    took = time.time() - t0
    bad = [(s, body[:200]) for _, s, body in first if s != 200 or b'"applied":true' not in body]
    if bad:
        failures.append(f"{len(bad)} of {len(first)} fresh commands were not applied, e.g. {bad[:3]}")
    again = deliver(k, [b for _, _, b in signed], headers)
    not_409 = [(s, body[:200]) for _, s, body in again
               if s != 409 or hostile.error_code(body) != "replay"]
    if not_409:
        failures.append(f"{len(not_409)} of {len(again)} resends were not 409 replay, e.g. {not_409[:3]}")

    # The largest nonce changes nothing for the next commands.
    huge = k.command(module="arbitrage", action="throttle", args={"throttle_pct": "100"},
                     issuer="dashboard", nonce=2**64 - 1, request_id=f"order-max-{uuid.uuid4()}")
    then = [k.command(module="arbitrage", action="throttle", args={"throttle_pct": "100"},
                      issuer="dashboard", nonce=time.time_ns(), request_id=f"order-after-{uuid.uuid4()}")
            for _ in range(10)]
    conn = hostile.H2(hostile.GATEWAY, k.ca)
    answers = [conn.request("POST", COMMANDS, headers, b) for b in [huge] + then]
    conn.close()
    if [s for s, _ in answers] != [200] * 11:
        failures.append(f"nonce 2^64-1 and the ten after it: {[(s, b[:120]) for s, b in answers]}")

    applied = modules(k, token)["arbitrage"]["applied"] - before
    want = len(signed) + 11
    if applied != want:
        failures.append(f"arbitrage applied {applied} commands, want {want}")
    # One `applied` row per command in the ledger.
    ids = []
    for _, _, body in signed:
        c = hostile.pb.Command()
        c.ParseFromString(body)
        ids.append(c.request_id)
    deadline = time.time() + 30
    while True:
        q = ("SELECT request_id, count() FROM control_decisions WHERE stage = 'agent' AND decision = 'applied' "
             "AND request_id LIKE 'order-%' GROUP BY request_id FORMAT JSONEachRow")
        rows = [json.loads(x) for x in hostile.ch_query(k, q).splitlines() if x.strip()]
        counts = {r["request_id"]: int(r["count()"]) for r in rows}
        if all(counts.get(i) == 1 for i in ids) or time.time() > deadline:
            break
        time.sleep(0.5)
    wrong = [i for i in ids if counts.get(i) != 1]
    if wrong:
        failures.append(f"{len(wrong)} commands do not have exactly one applied row, e.g. "
                        f"{[(i, counts.get(i)) for i in wrong[:3]]}")
    if failures:
        print("replay order: FAILED")
        for f in failures:
            print("  " + f)
        sys.exit(1)
    print(f"replay order: {len(signed)} commands of {len(ISSUERS)} issuers, signed concurrently and delivered "
          f"shuffled over 4 HTTP/3 + 4 HTTP/2 connections in {took:.1f} s: each applied once; "
          f"{len(again)} resends 409; nonce 2^64-1 and 10 after it applied")


if __name__ == "__main__":
    main()
