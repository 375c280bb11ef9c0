//! A test-only proxy-wasm 0.2.1 host on wasmtime: loads the built filter, implements
//! the host calls it uses (headers, bodies, local responses, shared data with Envoy's
//! CAS semantics, metrics, logs, time) and drives requests through it. Several
//! `Vm`s share one [`SharedData`], as Envoy's worker VMs do. Written from the ABI's
//! host side, apart from the filter's own code.

mod header_map;
mod shared_data;

use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::{Caller, Engine, Extern, Instance, Linker, Memory, Module, Store, TypedFunc};

pub use shared_data::{CasMismatch, SharedData};

/// A local response sent by the filter.
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What happened to a request.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Forwarded upstream with these headers and body.
    Forwarded {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Answered by the filter.
    Local(LocalResponse),
}

impl Outcome {
    pub fn status(&self) -> u32 {
        match self {
            Outcome::Forwarded { .. } => 200,
            Outcome::Local(l) => l.status,
        }
    }

    /// The rejection code of a local JSON response.
    pub fn code(&self) -> Option<String> {
        match self {
            Outcome::Local(l) => serde_json::from_slice::<serde_json::Value>(&l.body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned)),
            _ => None,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        match self {
            Outcome::Forwarded { headers, .. } => headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

pub struct State {
    shared: Arc<SharedData>,
    plugin_config: Vec<u8>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    local: Option<LocalResponse>,
    pub logs: Vec<(i32, String)>,
    metric_names: Vec<String>,
    metric_values: Vec<i64>,
    /// Values recorded per metric id (histograms).
    metric_samples: Vec<Vec<u64>>,
    pub now_secs: u64,
    /// Answer "not supported" to define_metric, like hosts without metrics.
    pub no_metrics: bool,
    /// `dispatch_http_call`s made, in order.
    pub calls: Vec<HttpCall>,
    /// Headers of the `http_call` response being delivered.
    call_response: Vec<(String, String)>,
    /// Tick period the filter asked for, milliseconds.
    pub tick_ms: u32,
}

/// One `proxy_http_call`.
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub token: u32,
    pub upstream: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

fn memory(caller: &mut Caller<'_, State>) -> Memory {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => m,
        _ => panic!("filter exports no memory"),
    }
}

fn read(caller: &mut Caller<'_, State>, ptr: i32, len: i32) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    memory(caller)
        .read(&*caller, ptr as usize, &mut buf)
        .expect("guest read");
    buf
}

fn write_u32(caller: &mut Caller<'_, State>, ptr: i32, v: u32) {
    memory(caller)
        .write(&mut *caller, ptr as usize, &v.to_le_bytes())
        .expect("guest write");
}

/// Copies `data` into guest memory allocated by the guest; writes pointer and size.
fn give(caller: &mut Caller<'_, State>, data: &[u8], ptr_ptr: i32, size_ptr: i32) {
    let alloc = caller
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .expect("proxy_on_memory_allocate");
    let alloc = alloc.typed::<i32, i32>(&*caller).expect("alloc type");
    let p = alloc.call(&mut *caller, data.len() as i32).expect("alloc");
    memory(caller)
        .write(&mut *caller, p as usize, data)
        .expect("guest write");
    write_u32(caller, ptr_ptr, p as u32);
    write_u32(caller, size_ptr, data.len() as u32);
}

fn serialize_map(pairs: &[(String, String)]) -> Vec<u8> {
    header_map::serialize(pairs)
}

fn deserialize_map(b: &[u8]) -> Vec<(String, String)> {
    header_map::parse(b).expect("the filter sent a malformed header map")
}

const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const CAS_MISMATCH: i32 = 8;
const UNIMPLEMENTED: i32 = 12;

/// The built filter (`bash scripts/test.sh` builds it first).
pub fn filter_wasm() -> PathBuf {
    crate::filter_wasm()
}

/// A compiled filter module and its engine.
pub struct Host {
    engine: Engine,
    module: Module,
    pub shared: Arc<SharedData>,
}

impl Default for Host {
    fn default() -> Self {
        Host::new()
    }
}

impl Host {
    /// A host with fresh shared data. The module is compiled once per test binary.
    pub fn new() -> Host {
        static COMPILED: std::sync::OnceLock<(Engine, Module)> = std::sync::OnceLock::new();
        let (engine, module) = COMPILED.get_or_init(|| {
            let engine = Engine::default();
            let module = Module::from_file(&engine, filter_wasm()).expect("load filter wasm");
            (engine, module)
        });
        Host {
            engine: engine.clone(),
            module: module.clone(),
            shared: Arc::new(SharedData::default()),
        }
    }

    /// The module's exports.
    pub fn exports(&self) -> Vec<String> {
        self.module.exports().map(|e| e.name().to_owned()).collect()
    }

    /// The module's imports, as `module::name`.
    pub fn imports(&self) -> Vec<String> {
        self.module
            .imports()
            .map(|i| format!("{}::{}", i.module(), i.name()))
            .collect()
    }

    fn linker(&self) -> Linker<State> {
        let mut l: Linker<State> = Linker::new(&self.engine);
        l.func_wrap(
            "env",
            "proxy_log",
            |mut c: Caller<'_, State>, level: i32, p: i32, n: i32| -> i32 {
                let msg = String::from_utf8_lossy(&read(&mut c, p, n)).into_owned();
                c.data_mut().logs.push((level, msg));
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_get_log_level",
            |mut c: Caller<'_, State>, ret: i32| -> i32 {
                write_u32(&mut c, ret, 1);
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_get_current_time_nanoseconds",
            |mut c: Caller<'_, State>, ret: i32| -> i32 {
                let ns = c.data().now_secs * 1_000_000_000;
                memory(&mut c)
                    .write(&mut c, ret as usize, &ns.to_le_bytes())
                    .unwrap();
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_set_tick_period_milliseconds",
            |mut c: Caller<'_, State>, ms: i32| -> i32 {
                c.data_mut().tick_ms = ms as u32;
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_set_effective_context",
            |_: Caller<'_, State>, _ctx: i32| -> i32 { OK },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_http_call",
            |mut c: Caller<'_, State>,
             up: i32,
             ups: i32,
             hp: i32,
             hs: i32,
             bp: i32,
             bs: i32,
             _tp: i32,
             _ts: i32,
             timeout_ms: i32,
             ret: i32|
             -> i32 {
                let upstream = String::from_utf8_lossy(&read(&mut c, up, ups)).into_owned();
                let headers = deserialize_map(&read(&mut c, hp, hs));
                let body = read(&mut c, bp, bs);
                let token = c.data().calls.len() as u32 + 1;
                c.data_mut().calls.push(HttpCall {
                    token,
                    upstream,
                    headers,
                    body,
                    timeout_ms: timeout_ms as u32,
                });
                write_u32(&mut c, ret, token);
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_get_buffer_bytes",
            |mut c: Caller<'_, State>, kind: i32, start: i32, max: i32, pp: i32, sp: i32| -> i32 {
                let data = match kind {
                    0 => c.data().body.clone(),          // HttpRequestBody
                    7 => c.data().plugin_config.clone(), // PluginConfiguration
                    _ => return NOT_FOUND,
                };
                let start = (start as u32 as usize).min(data.len());
                let end = start.saturating_add(max as u32 as usize).min(data.len());
                if start == end {
                    return NOT_FOUND;
                }
                give(&mut c, &data[start..end], pp, sp);
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_get_header_map_pairs",
            |mut c: Caller<'_, State>, kind: i32, pp: i32, sp: i32| -> i32 {
                if kind != 0 {
                    return NOT_FOUND;
                }
                let data = serialize_map(&c.data().headers);
                give(&mut c, &data, pp, sp);
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_get_header_map_value",
            |mut c: Caller<'_, State>, kind: i32, kp: i32, ks: i32, pp: i32, sp: i32| -> i32 {
                let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).to_ascii_lowercase();
                let map = match kind {
                    0 => &c.data().headers,
                    6 => &c.data().call_response,
                    _ => return NOT_FOUND,
                };
                let v = map.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
                match v {
                    Some(v) => {
                        give(&mut c, v.as_bytes(), pp, sp);
                        OK
                    }
                    None => NOT_FOUND,
                }
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_replace_header_map_value",
            |mut c: Caller<'_, State>, kind: i32, kp: i32, ks: i32, vp: i32, vs: i32| -> i32 {
                if kind != 0 {
                    return BAD_ARGUMENT;
                }
                let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).to_ascii_lowercase();
                let val = String::from_utf8_lossy(&read(&mut c, vp, vs)).into_owned();
                // As Envoy (`HeaderMap::setCopy`): the first line of the header is
                // replaced, further lines stay; none: added.
                let h = &mut c.data_mut().headers;
                match h.iter_mut().find(|(k, _)| *k == key) {
                    Some(first) => first.1 = val,
                    None => h.push((key, val)),
                }
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_add_header_map_value",
            |mut c: Caller<'_, State>, kind: i32, kp: i32, ks: i32, vp: i32, vs: i32| -> i32 {
                if kind != 0 {
                    return BAD_ARGUMENT;
                }
                let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).to_ascii_lowercase();
                let val = String::from_utf8_lossy(&read(&mut c, vp, vs)).into_owned();
                c.data_mut().headers.push((key, val));
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_remove_header_map_value",
            |mut c: Caller<'_, State>, kind: i32, kp: i32, ks: i32| -> i32 {
                if kind != 0 {
                    return BAD_ARGUMENT;
                }
                let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).to_ascii_lowercase();
                c.data_mut().headers.retain(|(k, _)| *k != key);
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_send_local_response",
            |mut c: Caller<'_, State>,
             status: i32,
             _dp: i32,
             _ds: i32,
             bp: i32,
             bs: i32,
             hp: i32,
             hs: i32,
             _grpc: i32|
             -> i32 {
                let body = read(&mut c, bp, bs);
                let headers = deserialize_map(&read(&mut c, hp, hs));
                c.data_mut().local = Some(LocalResponse {
                    status: status as u32,
                    headers,
                    body,
                });
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_get_shared_data",
            |mut c: Caller<'_, State>, kp: i32, ks: i32, pp: i32, sp: i32, casp: i32| -> i32 {
                let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).into_owned();
                match c.data().shared.get(&key) {
                    (Some(v), cas) => {
                        give(&mut c, &v, pp, sp);
                        write_u32(&mut c, casp, cas);
                        OK
                    }
                    (None, _) => NOT_FOUND,
                }
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_set_shared_data",
            |mut c: Caller<'_, State>, kp: i32, ks: i32, vp: i32, vs: i32, cas: i32| -> i32 {
                let key = String::from_utf8_lossy(&read(&mut c, kp, ks)).into_owned();
                let val = read(&mut c, vp, vs);
                match c.data().shared.set(&key, &val, cas as u32) {
                    Ok(()) => OK,
                    Err(_) => CAS_MISMATCH,
                }
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_define_metric",
            |mut c: Caller<'_, State>, _kind: i32, np: i32, ns: i32, ret: i32| -> i32 {
                if c.data().no_metrics {
                    return UNIMPLEMENTED;
                }
                let name = String::from_utf8_lossy(&read(&mut c, np, ns)).into_owned();
                // As Envoy: a name defined again (another root context of the
                // VM) is the same stat.
                let id = match c.data().metric_names.iter().position(|n| *n == name) {
                    Some(i) => i as u32,
                    None => {
                        let id = c.data().metric_names.len() as u32;
                        c.data_mut().metric_names.push(name);
                        c.data_mut().metric_values.push(0);
                        c.data_mut().metric_samples.push(Vec::new());
                        id
                    }
                };
                write_u32(&mut c, ret, id);
                OK
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_increment_metric",
            |mut c: Caller<'_, State>, id: i32, off: i64| -> i32 {
                match c.data_mut().metric_values.get_mut(id as usize) {
                    Some(v) => {
                        *v += off;
                        OK
                    }
                    None => NOT_FOUND,
                }
            },
        )
        .unwrap();
        l.func_wrap(
            "env",
            "proxy_record_metric",
            |mut c: Caller<'_, State>, id: i32, value: i64| -> i32 {
                match c.data_mut().metric_samples.get_mut(id as usize) {
                    Some(v) => {
                        v.push(value as u64);
                        OK
                    }
                    None => NOT_FOUND,
                }
            },
        )
        .unwrap();
        // WASI, as little as Rust's std needs here.
        l.func_wrap(
            "wasi_snapshot_preview1",
            "random_get",
            |mut c: Caller<'_, State>, p: i32, n: i32| -> i32 {
                let bytes: Vec<u8> = (0..n)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7))
                    .collect();
                memory(&mut c).write(&mut c, p as usize, &bytes).unwrap();
                0
            },
        )
        .unwrap();
        l.func_wrap(
            "wasi_snapshot_preview1",
            "environ_sizes_get",
            |mut c: Caller<'_, State>, a: i32, b: i32| -> i32 {
                write_u32(&mut c, a, 0);
                write_u32(&mut c, b, 0);
                0
            },
        )
        .unwrap();
        l.func_wrap(
            "wasi_snapshot_preview1",
            "environ_get",
            |_: Caller<'_, State>, _a: i32, _b: i32| -> i32 { 0 },
        )
        .unwrap();
        l.func_wrap(
            "wasi_snapshot_preview1",
            "clock_time_get",
            |mut c: Caller<'_, State>, _id: i32, _prec: i64, ret: i32| -> i32 {
                let ns = c.data().now_secs * 1_000_000_000;
                memory(&mut c)
                    .write(&mut c, ret as usize, &ns.to_le_bytes())
                    .unwrap();
                0
            },
        )
        .unwrap();
        l.func_wrap(
            "wasi_snapshot_preview1",
            "fd_write",
            |mut c: Caller<'_, State>, _fd: i32, iovs: i32, n: i32, written: i32| -> i32 {
                let mut total = 0u32;
                for i in 0..n {
                    let raw = read(&mut c, iovs + i * 8, 8);
                    let p = u32::from_le_bytes(raw[0..4].try_into().unwrap()) as i32;
                    let len = u32::from_le_bytes(raw[4..8].try_into().unwrap()) as i32;
                    let s = String::from_utf8_lossy(&read(&mut c, p, len)).into_owned();
                    c.data_mut().logs.push((-1, s));
                    total += len as u32;
                }
                write_u32(&mut c, written, total);
                0
            },
        )
        .unwrap();
        l.define_unknown_imports_as_traps(&self.module).unwrap();
        l
    }

    /// A new VM (one Envoy worker) configured with `config`; `Err` holds the
    /// filter's logs when it refuses the configuration.
    pub fn vm(&self, config: &str, now_secs: u64) -> Result<Vm, Vec<String>> {
        self.vm_with(config, now_secs, false)
    }

    /// As [`Host::vm`], optionally with a host that has no metrics.
    pub fn vm_with(
        &self,
        config: &str,
        now_secs: u64,
        no_metrics: bool,
    ) -> Result<Vm, Vec<String>> {
        let state = State {
            shared: self.shared.clone(),
            plugin_config: config.as_bytes().to_vec(),
            headers: Vec::new(),
            body: Vec::new(),
            local: None,
            logs: Vec::new(),
            metric_names: Vec::new(),
            metric_values: Vec::new(),
            metric_samples: Vec::new(),
            now_secs,
            no_metrics,
            calls: Vec::new(),
            call_response: Vec::new(),
            tick_ms: 0,
        };
        let mut store = Store::new(&self.engine, state);
        let instance = self
            .linker()
            .instantiate(&mut store, &self.module)
            .expect("instantiate");
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            init.call(&mut store, ()).expect("_initialize");
        }
        let f = |store: &mut Store<State>, name: &str| {
            instance
                .get_func(&mut *store, name)
                .unwrap_or_else(|| panic!("export {name}"))
        };
        let create = f(&mut store, "proxy_on_context_create")
            .typed::<(i32, i32), ()>(&store)
            .unwrap();
        let vm_start = f(&mut store, "proxy_on_vm_start")
            .typed::<(i32, i32), i32>(&store)
            .unwrap();
        let configure = f(&mut store, "proxy_on_configure")
            .typed::<(i32, i32), i32>(&store)
            .unwrap();
        Vm {
            headers_fn: f(&mut store, "proxy_on_request_headers")
                .typed(&store)
                .unwrap(),
            body_fn: f(&mut store, "proxy_on_request_body")
                .typed(&store)
                .unwrap(),
            // Optional, as in every host: called only if exported.
            done_fn: instance
                .get_func(&mut store, "proxy_on_done")
                .map(|d| d.typed(&store).unwrap()),
            delete_fn: f(&mut store, "proxy_on_delete").typed(&store).unwrap(),
            create,
            vm_start,
            configure,
            instance,
            store,
            root: 1,
            next_ctx: 1,
        }
        .with_root(config)
    }
}

/// One worker VM.
pub struct Vm {
    store: Store<State>,
    instance: Instance,
    create: TypedFunc<(i32, i32), ()>,
    vm_start: TypedFunc<(i32, i32), i32>,
    configure: TypedFunc<(i32, i32), i32>,
    headers_fn: TypedFunc<(i32, i32, i32), i32>,
    body_fn: TypedFunc<(i32, i32, i32), i32>,
    done_fn: Option<TypedFunc<i32, i32>>,
    delete_fn: TypedFunc<i32, ()>,
    /// The root context requests go to.
    root: i32,
    next_ctx: i32,
}

impl Vm {
    /// Starts one more root context in this VM with plugin configuration `config`
    /// (Envoy: another filter entry with the same `vm_id`); requests go to it.
    fn with_root(mut self, config: &str) -> Result<Vm, Vec<String>> {
        let root = self.next_ctx;
        self.next_ctx += 1;
        self.store.data_mut().plugin_config = config.as_bytes().to_vec();
        self.create
            .call(&mut self.store, (root, 0))
            .expect("root context");
        let started = self
            .vm_start
            .call(&mut self.store, (root, 0))
            .expect("vm start");
        assert_eq!(started, 1);
        let ok = self
            .configure
            .call(&mut self.store, (root, config.len() as i32))
            .expect("configure");
        if ok != 1 {
            return Err(self.logs());
        }
        self.root = root;
        Ok(self)
    }

    /// A configuration update: a new root context with `config` takes the
    /// requests, and the old one is deleted (`proxy_on_delete`), as Envoy does
    /// (it would call `proxy_on_done` first, which the filter does not export).
    pub fn update(self, config: &str) -> Result<Vm, Vec<String>> {
        let old = self.root;
        let mut vm = self.with_root(config)?;
        vm.delete_fn
            .call(&mut vm.store, old)
            .expect("proxy_on_delete");
        Ok(vm)
    }

    /// Configures the root context requests go to again, with `config`, as
    /// a host that reuses a root context does (Envoy makes a new one): whether
    /// the filter took it.
    pub fn configure_again(&mut self, config: &str) -> bool {
        self.store.data_mut().plugin_config = config.as_bytes().to_vec();
        self.configure
            .call(&mut self.store, (self.root, config.len() as i32))
            .expect("configure")
            == 1
    }

    /// The root context's tick.
    pub fn tick(&mut self) {
        let f = self
            .instance
            .get_typed_func::<i32, ()>(&mut self.store, "proxy_on_tick")
            .expect("proxy_on_tick");
        f.call(&mut self.store, self.root).expect("on_tick");
    }

    /// `http_call`s made so far.
    pub fn calls(&self) -> Vec<HttpCall> {
        self.store.data().calls.clone()
    }

    /// Tick period the filter asked for.
    pub fn tick_ms(&self) -> u32 {
        self.store.data().tick_ms
    }

    /// Delivers the response to call `token` with `status`.
    pub fn respond(&mut self, token: u32, status: u16) {
        self.deliver(token, vec![(":status".into(), status.to_string())]);
    }

    /// Ends call `token` with no answer (a timeout or a reset: Envoy delivers
    /// no headers).
    pub fn respond_without_answer(&mut self, token: u32) {
        self.deliver(token, Vec::new());
    }

    /// Calls `proxy_on_http_call_response` for `token` with `headers`.
    fn deliver(&mut self, token: u32, headers: Vec<(String, String)>) {
        let n = headers.len() as i32;
        self.store.data_mut().call_response = headers;
        let f = self
            .instance
            .get_typed_func::<(i32, i32, i32, i32, i32), ()>(
                &mut self.store,
                "proxy_on_http_call_response",
            )
            .expect("proxy_on_http_call_response");
        f.call(&mut self.store, (self.root, token as i32, n, 0, 0))
            .expect("on_http_call_response");
        self.store.data_mut().call_response.clear();
    }

    pub fn set_now(&mut self, now: u64) {
        self.store.data_mut().now_secs = now;
    }

    /// Counter value by metric name.
    pub fn metric(&self, name: &str) -> Option<i64> {
        let s = self.store.data();
        s.metric_names
            .iter()
            .position(|n| n == name)
            .map(|i| s.metric_values[i])
    }

    /// Values recorded in a histogram, by metric name.
    pub fn samples(&self, name: &str) -> Option<Vec<u64>> {
        let s = self.store.data();
        s.metric_names
            .iter()
            .position(|n| n == name)
            .map(|i| s.metric_samples[i].clone())
    }

    pub fn logs(&self) -> Vec<String> {
        self.store
            .data()
            .logs
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Sends one request; `body` arrives in `chunks` pieces.
    pub fn request(&mut self, headers: &[(&str, &str)], body: &[u8], chunks: usize) -> Outcome {
        self.request_to(self.root, headers, body, chunks)
    }

    /// Sends one request to the filter entry of root context `root`.
    pub fn request_to(
        &mut self,
        root: i32,
        headers: &[(&str, &str)],
        body: &[u8],
        chunks: usize,
    ) -> Outcome {
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        {
            let s = self.store.data_mut();
            s.headers = headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
                .collect();
            s.body.clear();
            s.local = None;
        }
        self.create
            .call(&mut self.store, (ctx, root))
            .expect("context create");
        let eos = i32::from(body.is_empty());
        let mut action = self
            .headers_fn
            .call(&mut self.store, (ctx, headers.len() as i32, eos))
            .expect("on_request_headers");
        if self.store.data().local.is_none() && !body.is_empty() {
            let chunk = body.len().div_ceil(chunks.max(1));
            for (i, piece) in body.chunks(chunk).enumerate() {
                self.store.data_mut().body.extend_from_slice(piece);
                let last = (i + 1) * chunk >= body.len();
                let total = self.store.data().body.len() as i32;
                action = self
                    .body_fn
                    .call(&mut self.store, (ctx, total, i32::from(last)))
                    .expect("on_request_body");
                if self.store.data().local.is_some() || (action == 0 && !last) {
                    break;
                }
            }
        }
        if let Some(done) = &self.done_fn {
            let _ = done.call(&mut self.store, ctx);
        }
        let _ = self.delete_fn.call(&mut self.store, ctx);
        let s = self.store.data();
        match (&s.local, action) {
            (Some(l), _) => Outcome::Local(l.clone()),
            (None, 0) => Outcome::Forwarded {
                headers: s.headers.clone(),
                body: s.body.clone(),
            },
            (None, a) => panic!("request neither forwarded nor answered (action {a})"),
        }
    }
}

/// The verify stage and the stamp stage in one chain, as Envoy runs them: two filter
/// entries (root contexts) in one VM, with a buffer filter between them, so the
/// stamp stage sees the headers after the body. Or, as a host may run them, the
/// stamp stage in a VM of its own (sharing only shared data).
pub struct Gateway {
    vm: Vm,
    verify_root: i32,
    /// Every verify stage configured in the VM, the first first.
    verify_roots: Vec<i32>,
    stamp_root: i32,
    /// The stamp stage's own VM, if it has one.
    stamp_vm: Option<Vm>,
}

impl Host {
    /// Both stages on one "worker".
    pub fn gateway(&self, config: &str, now_secs: u64) -> Result<Gateway, Vec<String>> {
        self.gateway_with(config, now_secs, false)
    }

    /// Both stages, optionally on a host without metrics.
    pub fn gateway_with(
        &self,
        config: &str,
        now_secs: u64,
        no_metrics: bool,
    ) -> Result<Gateway, Vec<String>> {
        let vm = self.vm_with(config, now_secs, no_metrics)?;
        let verify_root = vm.root;
        let vm = vm.with_root(r#"{"stage": "stamp"}"#)?;
        let stamp_root = vm.root;
        Ok(Gateway {
            vm,
            verify_root,
            verify_roots: vec![verify_root],
            stamp_root,
            stamp_vm: None,
        })
    }

    /// Both stages in one VM, requests going to the first of `1 + later` verify
    /// stages configured in it (as after `later` configuration updates while the
    /// first still serves requests in flight).
    pub fn gateway_after_updates(
        &self,
        config: &str,
        now_secs: u64,
        later: usize,
    ) -> Result<Gateway, Vec<String>> {
        self.gateway_after_updates_with(config, now_secs, &vec![config.to_owned(); later])
    }

    /// The same with the later verify stages configured with `later`.
    pub fn gateway_after_updates_with(
        &self,
        config: &str,
        now_secs: u64,
        later: &[String],
    ) -> Result<Gateway, Vec<String>> {
        let mut vm = self.vm(config, now_secs)?;
        let verify_root = vm.root;
        let mut verify_roots = vec![verify_root];
        for c in later {
            vm = vm.with_root(c)?;
            verify_roots.push(vm.root);
        }
        let vm = vm.with_root(r#"{"stage": "stamp"}"#)?;
        Ok(Gateway {
            stamp_root: vm.root,
            vm,
            verify_root,
            verify_roots,
            stamp_vm: None,
        })
    }

    /// The verify stage in one VM, the stamp stage in another.
    pub fn split_gateway(&self, config: &str, now_secs: u64) -> Result<Gateway, Vec<String>> {
        let vm = self.vm(config, now_secs)?;
        let verify_root = vm.root;
        let stamp_vm = self.vm(r#"{"stage": "stamp"}"#, now_secs)?;
        Ok(Gateway {
            stamp_root: stamp_vm.root,
            vm,
            verify_root,
            verify_roots: vec![verify_root],
            stamp_vm: Some(stamp_vm),
        })
    }
}

impl Gateway {
    pub fn request(&mut self, headers: &[(&str, &str)], body: &[u8], chunks: usize) -> Outcome {
        match self.verify(headers, body, chunks) {
            Outcome::Forwarded { headers, body } => match self.stamp(&headers) {
                Outcome::Forwarded { headers, .. } => Outcome::Forwarded { headers, body },
                local => local,
            },
            local => local,
        }
    }

    /// The verify stage alone: what it hands on (to the buffer, then the stamp stage).
    pub fn verify(&mut self, headers: &[(&str, &str)], body: &[u8], chunks: usize) -> Outcome {
        self.vm.request_to(self.verify_root, headers, body, chunks)
    }

    /// Requests go to the `i`th verify stage configured in the VM from now on
    /// (0: the first; see [`Host::gateway_after_updates`]).
    pub fn use_verify_stage(&mut self, i: usize) {
        self.verify_root = self.verify_roots[i];
    }

    /// The stamp stage alone, on headers the verify stage handed on.
    pub fn stamp(&mut self, headers: &[(String, String)]) -> Outcome {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let root = self.stamp_root;
        self.stamp_vm
            .as_mut()
            .unwrap_or(&mut self.vm)
            .request_to(root, &h, b"", 1)
    }

    pub fn set_now(&mut self, now: u64) {
        self.vm.set_now(now);
    }

    pub fn metric(&self, name: &str) -> Option<i64> {
        self.vm.metric(name)
    }

    pub fn samples(&self, name: &str) -> Option<Vec<u64>> {
        self.vm.samples(name)
    }

    pub fn logs(&self) -> Vec<String> {
        self.vm.logs()
    }
}
