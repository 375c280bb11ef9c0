"""A searcher sending opportunities to the sidecar's QUIC ingest endpoint
(`sender.strategy.ingest`) with aioquic, a QUIC and TLS stack of its own: a
self-signed Ed25519 client certificate (as on Solana's TPU), ALPN
`gw-opportunities`, the server's key pinned, one unidirectional stream of
length-delimited `hotpath.Opportunity` frames (proto/hotpath.proto).

    searcher.py --endpoint 127.0.0.1:8011 --key SEARCHER_SK_HEX_FILE \
        --server-identity SENDER_PK_HEX --module arbitrage --ev 1.0 TX_HEX [TX_HEX ...]

One opportunity per transaction. Prints `sent N` once the server acknowledged the
whole stream; exits 1 when the handshake fails or the server presents another key
(`--expect-refused`: exits 0 only if the handshake is refused). `--datagram`
sends a QUIC DATAGRAM frame instead (which the server does not take) and prints
`closed: code ...` once the server closed the connection for it.
"""
import argparse
import asyncio
import datetime
import os
import ssl
import struct
import sys
import tempfile

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def opportunity(module: str, features: list[float], ev: float, tx: bytes) -> bytes:
    """`hotpath.Opportunity` {module = 1, features = 2 (packed), ev = 3, txs = 4},
    protobuf by hand."""
    m = module.encode()
    body = b"\x0a" + varint(len(m)) + m
    if features:
        packed = struct.pack(f"<{len(features)}f", *features)
        body += b"\x12" + varint(len(packed)) + packed
    body += b"\x1d" + struct.pack("<f", ev)
    body += b"\x22" + varint(len(tx)) + tx
    return varint(len(body)) + body


def client_cert(seed: bytes, directory: str) -> tuple[str, str]:
    """A self-signed certificate of the Ed25519 key from `seed`: (cert, key) paths."""
    key = Ed25519PrivateKey.from_private_bytes(seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "searcher")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, None)
    )
    cert_path = os.path.join(directory, "searcher.pem")
    key_path = os.path.join(directory, "searcher.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    return cert_path, key_path


async def send(a, frames: bytes) -> None:
    host, port = a.endpoint.rsplit(":", 1)
    with tempfile.TemporaryDirectory() as d:
        seed = bytes.fromhex(open(a.key).read().strip())
        cert, key = client_cert(seed, d)
        config = QuicConfiguration(is_client=True, alpn_protocols=["gw-opportunities"])
        config.load_cert_chain(cert, key)
        # The server's certificate is self-signed by the sender's identity: it is
        # checked below, by its key, as Solana's TPU clients pin a leader.
        config.verify_mode = ssl.CERT_NONE
        async with connect(host, int(port), configuration=config, wait_connected=True) as client:
            quic = client._quic
            peer = quic.tls._peer_certificate
            got = peer.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            ).hex() if peer is not None else ""
            if got != a.server_identity.lower():
                raise SystemExit(f"the server presented key {got}, not {a.server_identity}")
            if a.datagram:
                # Not taken by the server (it offers no datagram support): a
                # protocol violation it must close the connection for.
                quic.send_datagram_frame(b"not wanted")
                client.transmit()
                for _ in range(200):
                    closed = quic._close_event
                    if closed is not None:
                        print(f"closed: code {closed.error_code:#x} {closed.reason_phrase!r}")
                        return
                    await asyncio.sleep(0.01)
                raise SystemExit("the server did not close the connection within 2 s")
            sid = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(sid, frames, end_stream=True)
            client.transmit()
            for _ in range(200):
                # A refused client certificate closes the connection after the
                # client's side of the handshake completed (TLS 1.3).
                closed = quic._close_event
                if closed is not None:
                    raise ConnectionError(
                        f"connection closed by the server: code {closed.error_code:#x} "
                        f"{closed.reason_phrase!r}"
                    )
                stream = quic._streams.get(sid)
                if stream is None or stream.sender.is_finished:
                    return
                await asyncio.sleep(0.01)
            raise SystemExit("the server did not acknowledge the stream within 2 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--key", required=True, help="file with the searcher's Ed25519 seed, hex")
    ap.add_argument("--server-identity", required=True, help="the sender's public key, hex")
    ap.add_argument("--module", default="arbitrage")
    ap.add_argument("--ev", type=float, default=1.0,
                    help="the searcher's own score, used only where no model serves the module")
    ap.add_argument("--features", default="",
                    help="comma-separated model features (where a model serves the module, "
                         "an opportunity whose features do not fit it is not sent)")
    ap.add_argument("--expect-refused", action="store_true")
    ap.add_argument("--datagram", action="store_true",
                    help="send a DATAGRAM frame instead of frames, and expect the close")
    ap.add_argument("txs", nargs="*", help="signed transactions, hex wire bytes")
    a = ap.parse_args()
    features = [float(f) for f in a.features.split(",") if f.strip()]
    frames = b"".join(opportunity(a.module, features, a.ev, bytes.fromhex(t)) for t in a.txs)
    try:
        asyncio.run(asyncio.wait_for(send(a, frames), timeout=10))
    except (ConnectionError, asyncio.TimeoutError, TimeoutError) as e:
        if a.expect_refused:
            print(f"refused: {type(e).__name__} {e}")
            return 0
        print(f"searcher: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if a.expect_refused:
        print("searcher: the handshake was not refused", file=sys.stderr)
        return 1
    if not a.datagram:
        print(f"sent {len(a.txs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
