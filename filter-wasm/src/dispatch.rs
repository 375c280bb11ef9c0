//! The proxy-wasm ABI 0.2.1 entry points: which callbacks the filter exports, and
//! which context each one reaches.
//!
//! Only the callbacks the filter uses are exported. Hosts call a `proxy_on_*`
//! callback only if the module exports it (the ABI makes them all optional), so a
//! request costs the host three calls into the VM (`context_create`,
//! `request_headers`, `delete`) plus the body calls of a command, where a module
//! exporting every callback (as the SDK does) costs seven or more: response headers,
//! body, trailers, `done` and `log` as well. In Envoy each call is a V8 entry.
//!
//! Nothing here panics: an unknown context id (a host bug, or a callback re-entered
//! while its context is in use) fails the request closed with a 503.

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::abi;
use crate::host::{reject_unknown_context, Action};
use crate::root::{Root, Stream};

#[derive(Default)]
struct Contexts {
    /// Root contexts (one per filter entry: the verify and the stamp stage share a VM).
    roots: BTreeMap<u32, Root>,
    /// Request contexts.
    streams: BTreeMap<u32, Stream>,
}

thread_local! {
    static CONTEXTS: RefCell<Contexts> = RefCell::new(Contexts::default());
}

/// Runs `f` on the request context `id`, taken out of the table meanwhile so that a
/// host call made by `f` can never meet a borrowed table.
fn with_stream(id: u32, f: impl FnOnce(&mut Stream) -> Action) -> u32 {
    let taken = CONTEXTS.with(|c| c.try_borrow_mut().ok()?.streams.remove(&id));
    let Some(mut stream) = taken else {
        return reject_unknown_context() as u32;
    };
    let action = f(&mut stream);
    CONTEXTS.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.streams.insert(id, stream);
        }
    });
    action as u32
}

/// Runs `f` on the root context `id`, taken out of the table meanwhile.
fn with_root<T>(id: u32, f: impl FnOnce(&mut Root) -> T) -> Option<T> {
    let mut root = CONTEXTS.with(|c| c.try_borrow_mut().ok()?.roots.remove(&id))?;
    let out = f(&mut root);
    CONTEXTS.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.roots.insert(id, root);
        }
    });
    Some(out)
}

/// Marks the module as built for ABI 0.2.1.
#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory for buffers the host hands the filter.
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    abi::allocate(size)
}

/// A new root context (`parent_id == 0`) or request context.
#[no_mangle]
pub extern "C" fn proxy_on_context_create(context_id: u32, parent_id: u32) {
    CONTEXTS.with(|c| {
        let Ok(mut c) = c.try_borrow_mut() else {
            return;
        };
        if parent_id == 0 {
            c.roots.insert(context_id, Root::default());
            return;
        }
        // A request of a root that does not exist gets an unconfigured verify
        // context, which rejects it: never a request that skips the filter.
        let stream = match c.roots.get(&parent_id) {
            Some(root) => root.create_stream(),
            None => Root::default().create_stream(),
        };
        c.streams.insert(context_id, stream);
    });
}

/// The VM started; nothing to do before the plugin configuration.
#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root_id: u32, _vm_config_size: usize) -> u32 {
    1
}

/// The plugin configuration of root context `root_id`; 0 fails plugin start.
#[no_mangle]
pub extern "C" fn proxy_on_configure(root_id: u32, _config_size: usize) -> u32 {
    with_root(root_id, Root::on_configure).map_or(0, u32::from)
}

/// The root context's timer (edge reports).
#[no_mangle]
pub extern "C" fn proxy_on_tick(root_id: u32) {
    with_root(root_id, Root::on_tick);
}

/// The answer to a root context's `http_call` (edge reports).
#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    root_id: u32,
    token: u32,
    _headers: usize,
    _body_size: usize,
    _trailers: usize,
) {
    with_root(root_id, |r| r.on_http_call_response(token));
}

/// The request head.
#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context_id: u32, _headers: usize, eos: u32) -> u32 {
    with_stream(context_id, |s| match s {
        Stream::Verify(h) => h.on_request_headers(eos != 0),
        Stream::Stamp(st) => st.on_request_headers(),
    })
}

/// Request body bytes so far.
#[no_mangle]
pub extern "C" fn proxy_on_request_body(context_id: u32, body_size: usize, eos: u32) -> u32 {
    with_stream(context_id, |s| match s {
        Stream::Verify(h) => h.on_request_body(body_size, eos != 0),
        Stream::Stamp(_) => Action::Continue,
    })
}

/// Request trailers.
#[no_mangle]
pub extern "C" fn proxy_on_request_trailers(context_id: u32, _trailers: usize) -> u32 {
    with_stream(context_id, |s| match s {
        Stream::Verify(h) => h.on_request_trailers(),
        Stream::Stamp(_) => Action::Continue,
    })
}

/// The host is done with a context: forget it.
#[no_mangle]
pub extern "C" fn proxy_on_delete(context_id: u32) {
    CONTEXTS.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            if c.streams.remove(&context_id).is_none() {
                c.roots.remove(&context_id);
            }
        }
    });
}
