"""Reference implementations for interop tests: the original API's signer (Python
protobuf + PyNaCl, exactly as ORIGINAL_SPEC §3.2 signs) and PyJWT.

  reference.py vectors OUT.json       write signed commands and JWTs with expectations
  reference.py verify  < cases.json   verify commands signed elsewhere, the way a
                                      Python agent would (decode, clear, deterministic
                                      re-serialize, PyNaCl verify); prints JSON results
"""
import atexit
import json
import os
import shutil
import sys
import tempfile
import time

from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "..", "proto")


def load_protos():
    out = tempfile.mkdtemp(prefix="gw-pb-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    for inc, name in ((PROTO_DIR, "control.proto"), (HERE, "control_v2.proto")):
        rc = protoc.main(["protoc", f"-I{inc}", f"--python_out={out}", name])
        if rc != 0:
            sys.exit(f"protoc failed for {name}")
    sys.path.insert(0, out)
    import control_pb2
    import control_v2_pb2
    return control_pb2, control_v2_pb2


def sign_command(cmd, sk, pubkey_id):
    """The original API's sign_command, verbatim in behaviour."""
    cmd.sig = b""
    cmd.pubkey_id = ""
    cmd.sig_alg = ""
    payload = cmd.SerializeToString(deterministic=True)
    cmd.sig = sk.sign(payload).signature
    cmd.pubkey_id = pubkey_id
    cmd.sig_alg = "ed25519-v1"
    return cmd


def vectors(out_path):
    from nacl.signing import SigningKey
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm

    pb, pb2 = load_protos()
    now = int(time.time())
    sk = SigningKey(bytes(range(32)))
    pk_hex = sk.verify_key.encode().hex()
    cmds = []

    def add(name, body, expect, **extra):
        cmds.append({"name": name, "body_hex": body.hex(), "expect": expect, **extra})

    def base(args, nonce):
        action = pb.Command.THROTTLE if args else pb.Command.START
        c = pb.Command(ts=now, module=pb.Command.MEV, action=action,
                       request_id=f"req-{nonce}", issuer="dashboard",
                       schema_version="ctrl-v1", nonce=nonce)
        for k, v in args:  # insertion order, as the original API fills args
            c.args[k] = v
        return c

    arg_sets = {
        "0args": [],
        "1arg": [("throttle_pct", "40")],
        "3args": [("throttle_pct", "40"), ("ev_min", "0.25"), ("tip_ladder", "0.1,0.2,0.35")],
        "6args": [("zz", "1"), ("tip_ladder", "0.5"), ("b", "2"), ("throttle_pct", "7"),
                  ("a", ""), ("ev_min", "1e-3")],
    }
    nonce = 1000
    for label, args in arg_sets.items():
        nonce += 1
        c = sign_command(base(args, nonce), sk, "op-admin-1")
        det = c.SerializeToString(deterministic=True)
        nondet = c.SerializeToString()
        add(f"deterministic-{label}", det, "ok")
        # The original API publishes SerializeToString() without deterministic=True.
        add(f"published-{label}", nondet, "ok", canonical=(nondet == det))

    # A newer client: fields 12 and 13 are known to it, unknown to us.
    nonce += 1
    c2 = pb2.Command(ts=now, module=pb2.Command.MEV, action=pb2.Command.POLICY,
                     request_id="req-v2", issuer="dashboard", schema_version="ctrl-v1",
                     nonce=nonce, route_hint="jito-first", tags=[3, 1, 2])
    c2.args["ev_min"] = "0.5"
    c2.args["tip_ladder"] = "0.1,0.2"
    c2 = sign_command(c2, sk, "op-admin-1")
    add("newer-client-unknown-fields", c2.SerializeToString(deterministic=True), "ok")
    add("newer-client-unknown-fields-published", c2.SerializeToString(), "ok")

    # A v1 agent relaying a v2 message it parsed (unknown fields kept by upb) and signing it.
    nonce += 1
    relay = pb.Command()
    relay.ParseFromString(c2.SerializeToString())
    relay.nonce = nonce
    relay = sign_command(relay, sk, "op-admin-1")
    add("relayed-unknown-fields", relay.SerializeToString(deterministic=True), "ok")

    # Rejections.
    nonce += 1
    good = sign_command(base(arg_sets["3args"], nonce), sk, "op-admin-1")
    gb = good.SerializeToString(deterministic=True)
    i = gb.index(b"req-")
    add("changed-byte", gb[:i] + b"X" + gb[i + 1:], "bad_signature")
    m = pb.Command(); m.CopyFrom(good); m.nonce += 1
    add("changed-nonce", m.SerializeToString(deterministic=True), "bad_signature")
    m = pb.Command(); m.CopyFrom(good); m.args["throttle_pct"] = "100"
    add("changed-args", m.SerializeToString(deterministic=True), "bad_signature")
    m = pb.Command(); m.CopyFrom(good); m.args["extra"] = "1"
    add("added-arg", m.SerializeToString(deterministic=True), "bad_signature")
    m = pb.Command(); m.CopyFrom(good); m.sig_alg = "ed25519"
    add("wrong-sig-alg", m.SerializeToString(deterministic=True), "sig_alg")
    m = pb.Command(); m.CopyFrom(good); m.sig = good.sig[:63]
    add("short-signature", m.SerializeToString(deterministic=True), "bad_sig_length")
    m = pb.Command(); m.CopyFrom(good); m.pubkey_id = "op-unknown"
    add("unknown-key", m.SerializeToString(deterministic=True), "unknown_key")
    add("truncated", gb[:-5], "malformed")
    other = sign_command(base(arg_sets["1arg"], nonce), SigningKey(bytes(32)), "op-admin-1")
    add("other-signer", other.SerializeToString(deterministic=True), "bad_signature")

    # JWTs from PyJWT.
    secret = b"interop-secret-interop-secret-32b!"
    es_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    es_jwk = json.loads(ECAlgorithm.to_jwk(es_key.public_key()))
    es_jwk["kid"] = "es"
    ed_jwk = json.loads(OKPAlgorithm.to_jwk(ed_key.public_key()))
    ed_jwk["kid"] = "ed"
    import base64
    oct_jwk = {"kty": "oct", "kid": "hs", "k": base64.urlsafe_b64encode(secret).rstrip(b"=").decode()}
    claims = {"sub": "alice", "iss": "defi-dashboard", "aud": "defi-users",
              "exp": now + 300, "nbf": now - 5, "iat": now, "roles": ["admin"]}
    jwts = []

    def tok(name, token, expect):
        jwts.append({"name": name, "token": token, "expect": expect})

    tok("hs256", jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "hs"}), "ok")
    tok("hs256-no-kid", jwt.encode(claims, secret, algorithm="HS256"), "ok")
    tok("es256", jwt.encode(claims, es_key, algorithm="ES256", headers={"kid": "es"}), "ok")
    tok("eddsa", jwt.encode(claims, ed_key, algorithm="EdDSA", headers={"kid": "ed"}), "ok")
    t = jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "hs"})
    h, p, s = t.split(".")
    forged = dict(claims, roles=["admin", "root"])
    p2 = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    tok("tampered-payload", f"{h}.{p2}.{s}", "jwt_signature")
    t = jwt.encode(claims, es_key, algorithm="ES256", headers={"kid": "es"})
    h, p, s = t.split(".")
    tok("tampered-es256", f"{h}.{p2}.{s}", "jwt_signature")
    tok("expired", jwt.encode(dict(claims, exp=now - 3600), secret, algorithm="HS256"), "jwt_expired")
    tok("expired-eddsa", jwt.encode(dict(claims, exp=now - 3600), ed_key, algorithm="EdDSA"), "jwt_expired")
    tok("not-yet-valid", jwt.encode(dict(claims, nbf=now + 3600), secret, algorithm="HS256"), "jwt_not_yet_valid")
    tok("wrong-audience", jwt.encode(dict(claims, aud="others"), secret, algorithm="HS256"), "jwt_audience")
    tok("wrong-issuer", jwt.encode(dict(claims, iss="evil"), secret, algorithm="HS256"), "jwt_issuer")
    tok("alg-none", jwt.encode(claims, None, algorithm="none"), "jwt_alg")
    tok("wrong-secret", jwt.encode(claims, b"x" * 40, algorithm="HS256"), "jwt_signature")

    with open(out_path, "w") as f:
        json.dump({
            "now": now,
            "keys": {"op-admin-1": pk_hex},
            "commands": cmds,
            "jwks": {"keys": [oct_jwk, es_jwk, ed_jwk]},
            "jwt_policy": {"issuers": ["defi-dashboard"], "audiences": ["defi-users"]},
            "jwts": jwts,
        }, f, indent=1)


def verify():
    from nacl.signing import VerifyKey
    from nacl.exceptions import BadSignatureError
    pb, _ = load_protos()
    results = []
    for case in json.load(sys.stdin):
        cmd = pb.Command()
        cmd.ParseFromString(bytes.fromhex(case["body_hex"]))
        sig = cmd.sig
        cmd.sig = b""
        cmd.pubkey_id = ""
        cmd.sig_alg = ""
        try:
            VerifyKey(bytes.fromhex(case["pk_hex"])).verify(cmd.SerializeToString(deterministic=True), sig)
            results.append({"name": case["name"], "ok": True, "args": dict(cmd.args)})
        except BadSignatureError:
            results.append({"name": case["name"], "ok": False})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "vectors":
        vectors(sys.argv[2])
    elif len(sys.argv) == 2 and sys.argv[1] == "verify":
        verify()
    else:
        sys.exit(__doc__)
