"""Transaction messages, many of them out of bounds, serialized by solders (the
Rust SDK's Python bindings) with what the SDK says of each: `refused` when its
`VersionedTransaction.sanitize` fails (Agave's RPC refuses those before sending),
`dup` when it passes but an account key is listed twice (Agave's
`AccountLoadedTwice`), else `ok`. Signatures are zeros: the structure is what is
compared (txwire::parse without verifying). Seeded: the same cases every run.
Prints one JSON object per line.

  sanitize_cases.py [SEED] [COUNT]
"""
import json
import random
import sys

from solders.hash import Hash
from solders.instruction import CompiledInstruction
from solders.message import Message, MessageAddressTableLookup, MessageHeader, MessageV0
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.transaction import VersionedTransaction


def small_bytes(rng, top, most):
    return bytes(rng.randint(0, top) for _ in range(rng.randint(0, most)))


def case(rng, pool):
    nk = rng.randint(1, 6)
    # Mostly distinct keys; sometimes one listed twice.
    keys = rng.sample(pool, nk)
    if nk > 1 and rng.random() < 0.15:
        keys[rng.randrange(1, nk)] = keys[rng.randrange(nk)]
    required = rng.randint(1, min(nk + 1, 3))
    ro_signed = rng.choice([0, 0, 0, 1, required])
    ro_unsigned = rng.randint(0, max(0, nk - required) + 1)
    v0 = rng.random() < 0.5
    lookups = []
    if v0:
        for _ in range(rng.choice([0, 0, 1, 2])):
            lookups.append(MessageAddressTableLookup(
                Pubkey(bytes([200 + rng.randint(0, 50)] * 32)),
                small_bytes(rng, 255, 3), small_bytes(rng, 255, 3)))
    loaded = sum(len(bytes(l.writable_indexes)) + len(bytes(l.readonly_indexes)) for l in lookups)
    ixs = []
    for _ in range(rng.randint(0, 3)):
        # Indexes around the edges: the fee payer, the last static key, past it,
        # a loaded key, past every key.
        program = rng.choice([0, 1, nk - 1, nk, nk + loaded, rng.randint(0, 9)])
        top = nk + loaded
        accounts = bytes(rng.choice([0, top - 1, top, rng.randint(0, 9)]) % 256
                         for _ in range(rng.randint(0, 3)))
        ixs.append(CompiledInstruction(program % 256, small_bytes(rng, 255, 4), accounts))
    blockhash = Hash(bytes([rng.randint(0, 255)] * 32))
    if v0:
        msg = MessageV0(MessageHeader(required, ro_signed, ro_unsigned), keys, blockhash, ixs, lookups)
    else:
        msg = Message.new_with_compiled_instructions(required, ro_signed, ro_unsigned, keys, blockhash, ixs)
    n_sigs = required if rng.random() < 0.9 else max(1, required + rng.choice([-1, 1]))
    tx = VersionedTransaction.populate(msg, [Signature.default()] * n_sigs)
    try:
        tx.sanitize()
        expect = "dup" if len(set(keys)) < len(keys) else "ok"
    except Exception:  # solders raises its SanitizeError
        expect = "refused"
    return {"hex": bytes(tx).hex(), "expect": expect, "v0": v0}


def main():
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    rng = random.Random(seed)
    pool = [Pubkey(bytes([i + 1] * 32)) for i in range(12)]
    for _ in range(count):
        print(json.dumps(case(rng, pool)))


if __name__ == "__main__":
    main()
