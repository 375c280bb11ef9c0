// Times the wasm verify guest (bench/wasm-verify) in V8 — the engine Envoy embeds —
// through Node.js. Prints JSON: microseconds per call, for the raw signature and the
// whole verify_command, with ed25519-dalek and with the core's tables.
// Usage: node bench/v8_verify.mjs GUEST.wasm PK_HEX BODY_HEX PAYLOAD_HEX SIG_HEX
import { readFileSync } from "node:fs";

const [wasmPath, pkHex, bodyHex, payloadHex, sigHex] = process.argv.slice(2);
const hex = (h) => Uint8Array.from(h.match(/../g) ?? [], (b) => parseInt(b, 16));
const module = new WebAssembly.Module(readFileSync(wasmPath));
// Every import is a stub that reports success; the guest needs none on this path.
const imports = {};
for (const imp of WebAssembly.Module.imports(module)) {
  (imports[imp.module] ??= {})[imp.name] = () => 0;
}
const { exports } = new WebAssembly.Instance(module, imports);
if (exports._initialize) exports._initialize();
const put = (bytes) => {
  const p = exports.bench_alloc(bytes.length);
  new Uint8Array(exports.memory.buffer, p, bytes.length).set(bytes);
  return p;
};
const pk = put(hex(pkHex));
const body = hex(bodyHex);
const bodyPtr = put(body);
const payload = hex(payloadHex);
const payloadPtr = put(payload);
const sigPtr = put(hex(sigHex));
if (exports.bench_set_key(pk) !== 0) throw new Error("set key failed");
for (const t of [0, 1]) {
  if (exports.bench_verify_command(bodyPtr, body.length, t) !== 0) throw new Error("verify failed");
  if (exports.bench_verify_raw(payloadPtr, payload.length, sigPtr, t) !== 0) throw new Error("raw verify failed");
}

function time(fn) {
  for (let i = 0; i < 2000; i++) fn(); // let V8 tier up (Liftoff -> TurboFan)
  const runs = [];
  for (let r = 0; r < 7; r++) {
    const n = 500;
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < n; i++) fn();
    runs.push(Number(process.hrtime.bigint() - t0) / n / 1000);
  }
  runs.sort((a, b) => a - b);
  return runs[3]; // median of 7
}
console.log(JSON.stringify({
  node: process.version,
  raw_dalek: time(() => exports.bench_verify_raw(payloadPtr, payload.length, sigPtr, 0)),
  raw_tables: time(() => exports.bench_verify_raw(payloadPtr, payload.length, sigPtr, 1)),
  command_dalek: time(() => exports.bench_verify_command(bodyPtr, body.length, 0)),
  command_tables: time(() => exports.bench_verify_command(bodyPtr, body.length, 1)),
}));
