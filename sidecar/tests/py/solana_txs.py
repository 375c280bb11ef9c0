"""Real Solana transactions built and signed by an independent library (solders,
the Rust SDK's Python bindings): a legacy transfer and a v0 transfer with a memo,
each as wire bytes (base58 and base64) with the signature Solana names it by.
Prints one JSON object per line."""
import base64
import json
import sys

from solders.hash import Hash
from solders.instruction import Instruction, AccountMeta
from solders.keypair import Keypair
from solders.message import Message, MessageV0
from solders.pubkey import Pubkey
from solders.system_program import TransferParams, transfer
from solders.transaction import Transaction, VersionedTransaction

ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def b58encode(raw: bytes) -> str:
    """Base58 (Bitcoin alphabet); solders exposes none for arbitrary bytes."""
    n = int.from_bytes(raw, "big")
    digits = ""
    while n:
        n, r = divmod(n, 58)
        digits = ALPHABET[r] + digits
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + digits


def out(kind, tx):
    raw = bytes(tx)
    print(json.dumps({
        "kind": kind,
        "b58": b58encode(raw),
        "b64": base64.b64encode(raw).decode(),
        "signature": str(tx.signatures[0]),
        "hex": raw.hex(),
    }))


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    payer = Keypair.from_seed(bytes([7] * 32))
    to = Keypair.from_seed(bytes([8] * 32)).pubkey()
    memo = Pubkey.from_string("MemoSq4gqABAXKb96qWdaMmJpfNK9iahvJPjJZdWmQv")
    for i in range(n):
        blockhash = Hash(bytes([i % 256] + [42] * 31))
        ix = transfer(TransferParams(from_pubkey=payer.pubkey(), to_pubkey=to, lamports=1000 + i))
        legacy = Transaction([payer], Message([ix], payer.pubkey()), blockhash)
        out("legacy", legacy)
        note = Instruction(memo, f"gw test {i}".encode(), [AccountMeta(payer.pubkey(), True, False)])
        v0 = VersionedTransaction(MessageV0.try_compile(payer.pubkey(), [ix, note], [], blockhash), [payer])
        out("v0", v0)


if __name__ == "__main__":
    main()
