"""An independent HTTP/3 client (aioquic) for gateway tests.

Reads JSON on stdin:
  {"host": "127.0.0.1", "port": 8443, "server_name": "localhost", "ca": "ca.pem",
   "requests": [{"method": "POST", "path": "/x", "headers": [["k", "v"]], "body_hex": ""}],
   "parallel": true}
Each request goes on its own QUIC connection; with "parallel" they all run at once.
Writes a JSON list of {"status", "headers", "body"} (body as text) in request order.
"""
import asyncio
import json
import sys

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._streams = {}

    def quic_event_received(self, event):
        for ev in self._http.handle_event(event):
            if isinstance(ev, (HeadersReceived, DataReceived)):
                fut, resp = self._streams[ev.stream_id]
                if isinstance(ev, HeadersReceived):
                    for k, v in ev.headers:
                        resp["headers"][k.decode()] = v.decode()
                else:
                    resp["body"] += ev.data
                if ev.stream_ended and not fut.done():
                    fut.set_result(resp)

    async def request(self, authority, req):
        sid = self._quic.get_next_available_stream_id()
        body = bytes.fromhex(req.get("body_hex", ""))
        headers = [(b":method", req["method"].encode()), (b":scheme", b"https"),
                   (b":authority", authority.encode()), (b":path", req["path"].encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in req.get("headers", [])]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
        fut = asyncio.get_running_loop().create_future()
        self._streams[sid] = (fut, {"headers": {}, "body": b""})
        self._http.send_headers(sid, headers, end_stream=not body)
        if body:
            self._http.send_data(sid, body, end_stream=True)
        self.transmit()
        return await asyncio.wait_for(fut, 15)


async def one(spec, req):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=spec["server_name"])
    cfg.load_verify_locations(spec["ca"])
    async with connect(spec["host"], spec["port"], configuration=cfg, create_protocol=Client) as c:
        r = await c.request(f'{spec["server_name"]}:{spec["port"]}', req)
        return {"status": int(r["headers"].get(":status", "0")), "headers": r["headers"],
                "body": r["body"].decode(errors="replace")}


async def main():
    spec = json.load(sys.stdin)
    if spec.get("parallel"):
        out = await asyncio.gather(*(one(spec, r) for r in spec["requests"]))
    else:
        out = [await one(spec, r) for r in spec["requests"]]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
