#!/usr/bin/env python3
"""Writes the sidecar configuration of a development gateway: sidecar/config.example.json
with the transaction sender on — one TPU leader (the development TPU, pinned by its
identity), a relay, route policy tpu_first, and the QUIC ingest allowing the dev
searcher's key; the API routes' roles, the control role and the command path
copied from the filter's configuration, so that the edge and the sidecar check the
same table and the console posts where the edge takes commands. The local run
(scripts/run-gateway.sh) and compose
(scripts/compose-init.sh) both write theirs with it, so they differ only in
addresses. Standard library only.

  sidecar-config.py --keys DIR --filter-config FILE --tpu IP:PORT --relay URL \
      --ingest IP:PORT -o FILE

DIR holds tpu-sink.pk.hex and searcher.pk.hex (scripts/dev-keys.sh).
"""
import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58(raw):
    n, out = int.from_bytes(raw, "big"), ""
    while n:
        n, r = divmod(n, 58)
        out = ALPHABET[r] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


def public_key(keys, name):
    raw = bytes.fromhex(open(os.path.join(keys, f"{name}.pk.hex")).read().strip())
    if len(raw) != 32:
        raise SystemExit(f"sidecar-config: {name}.pk.hex is not an Ed25519 public key")
    return b58(raw)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", required=True)
    ap.add_argument("--filter-config", required=True, help="the filter's configuration (JSON)")
    ap.add_argument("--tpu", required=True, help="the leader's TPU QUIC address (IP:PORT)")
    ap.add_argument("--relay", required=True, help="the relay's URL")
    ap.add_argument("--ingest", required=True, help="where the QUIC ingest listens (IP:PORT)")
    ap.add_argument("--state-dir", default=None,
                    help="the state directory, absolute (default: the example's, relative to the working directory)")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    cfg = json.load(open(os.path.join(ROOT, "sidecar/config.example.json")))
    cfg["checkpoint_every_secs"] = 5
    # The example's command key is a placeholder (refused): the node's own.
    cfg["command_keys"]["keys"][0]["public_key_hex"] = \
        open(os.path.join(a.keys, "op-admin-1.pk.hex")).read().strip()
    if a.state_dir:
        cfg["state_dir"] = a.state_dir
    edge = json.load(open(a.filter_config))
    cfg["routes"] = edge["routes"]
    cfg["command_role"] = edge.get("command_role", "admin")
    cfg["command_path"] = edge.get("command_path", "/api/control/commands")
    cfg["sender"] = {
        "tpu": {},
        "relay": {"url": a.relay},
        "leaders": {"static": [{"tpu_quic": a.tpu, "identity": public_key(a.keys, "tpu-sink")}]},
        "hedge_delay_ms": 10,
        "route_policy": "tpu_first",
        "strategy": {"ingest": {"bind": a.ingest, "allow": [public_key(a.keys, "searcher")]}},
    }
    with open(a.out, "w") as f:
        json.dump(cfg, f, indent=2)


if __name__ == "__main__":
    main()
