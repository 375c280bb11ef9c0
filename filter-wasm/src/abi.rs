//! The proxy-wasm ABI 0.2.1 host calls the filter makes, declared directly so every
//! host status comes back as a value: the SDK's `hostcalls` panic on statuses they
//! do not expect (e.g. `define_metric` on a host without metrics), and a panic in a
//! worker VM would take down its request path.

#![allow(unsafe_code)] // FFI: every unsafe block says why it is sound.

use crate::header_map;

/// A host status other than `Ok` (proxy-wasm `WasmResult`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The item does not exist.
    NotFound,
    /// An argument was not acceptable.
    BadArgument,
    /// The host could not serialise the answer.
    SerializationFailure,
    /// The host could not parse what it was given.
    ParseFailure,
    /// Nothing to return.
    Empty,
    /// A shared-data write lost a compare-and-swap.
    CasMismatch,
    /// The host failed.
    InternalFailure,
    /// The host does not implement the call.
    Unimplemented,
    /// A status this ABI version does not name.
    Unknown(u32),
}

impl Status {
    fn check(raw: u32) -> Result<(), Status> {
        Err(match raw {
            0 => return Ok(()),
            1 => Status::NotFound,
            2 => Status::BadArgument,
            3 => Status::SerializationFailure,
            4 => Status::ParseFailure,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            10 => Status::InternalFailure,
            12 => Status::Unimplemented,
            other => Status::Unknown(other),
        })
    }
}

/// Buffers the filter reads (proxy-wasm `BufferType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum BufferType {
    /// The request body.
    HttpRequestBody = 0,
    /// The plugin configuration.
    PluginConfiguration = 7,
}

/// Header maps the filter reads or writes (proxy-wasm `MapType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum MapType {
    /// Request headers.
    HttpRequestHeaders = 0,
    /// The headers of an `http_call`'s response.
    HttpCallResponseHeaders = 6,
}

/// Kinds of metrics (proxy-wasm `MetricType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum MetricType {
    /// A counter.
    Counter = 0,
    /// A histogram.
    Histogram = 2,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(return_time: *mut u64) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
    fn proxy_send_local_response(
        status_code: u32,
        status_code_details_data: *const u8,
        status_code_details_size: usize,
        body_data: *const u8,
        body_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_get_shared_data(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    fn proxy_define_metric(
        metric_type: u32,
        name_data: *const u8,
        name_size: usize,
        return_id: *mut u32,
    ) -> u32;
    fn proxy_increment_metric(metric_id: u32, offset: i64) -> u32;
    fn proxy_record_metric(metric_id: u32, value: u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_http_call(
        upstream_data: *const u8,
        upstream_size: usize,
        headers_data: *const u8,
        headers_size: usize,
        body_data: *const u8,
        body_size: usize,
        trailers_data: *const u8,
        trailers_size: usize,
        timeout_milliseconds: u32,
        return_token: *mut u32,
    ) -> u32;
}

fn check(s: u32) -> Result<(), Status> {
    Status::check(s)
}

/// Memory the host asks for to hand the filter a buffer: exactly `size` bytes, so
/// [`take`] can own it as a `Vec` of that capacity. Null when out of memory.
pub fn allocate(size: usize) -> *mut u8 {
    if size == 0 {
        return std::ptr::NonNull::<u8>::dangling().as_ptr();
    }
    match std::alloc::Layout::array::<u8>(size) {
        // SAFETY: the layout has a non-zero size.
        Ok(layout) => unsafe { std::alloc::alloc(layout) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// Takes ownership of a host-returned buffer, allocated by [`allocate`] with
/// exactly `size` bytes.
///
/// # Safety
/// `ptr`/`size` must come from the host after a successful call.
unsafe fn take(ptr: *mut u8, size: usize) -> Vec<u8> {
    if ptr.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the caller's contract: `allocate` gave exactly `size` bytes at `ptr`.
    unsafe { Vec::from_raw_parts(ptr, size, size) }
}

/// Log levels (proxy-wasm `LogLevel`).
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum Level {
    /// Debug.
    Debug = 1,
    /// Info.
    Info = 2,
    /// Warn.
    Warn = 3,
    /// Error.
    Error = 4,
}

/// Logs a line; a host that cannot log loses it.
pub fn log(level: Level, msg: &str) {
    // SAFETY: pointer and length describe `msg`.
    let _ = unsafe { proxy_log(level as u32, msg.as_ptr(), msg.len()) };
}

/// Host time in nanoseconds since the epoch.
pub fn now_nanos() -> Result<u64, Status> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid out-pointer.
    check(unsafe { proxy_get_current_time_nanoseconds(&mut t) })?;
    Ok(t)
}

/// Reads up to `max` bytes of a buffer; `Ok(None)` when it is absent.
pub fn get_buffer(
    buffer_type: BufferType,
    start: usize,
    max: usize,
) -> Result<Option<Vec<u8>>, Status> {
    let mut p: *mut u8 = std::ptr::null_mut();
    let mut n: usize = 0;
    // SAFETY: valid out-pointers.
    let s = unsafe { proxy_get_buffer_bytes(buffer_type as u32, start, max, &mut p, &mut n) };
    match check(s) {
        // SAFETY: the host returned a buffer it allocated with `allocate`.
        Ok(()) => Ok(Some(unsafe { take(p, n) })),
        Err(Status::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// All request headers, serialised (parse with [`header_map::parse_borrowed`]).
pub fn request_headers_raw() -> Result<Vec<u8>, Status> {
    let mut p: *mut u8 = std::ptr::null_mut();
    let mut n: usize = 0;
    // SAFETY: valid out-pointers.
    check(unsafe {
        proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut p, &mut n)
    })?;
    // SAFETY: the host returned a buffer it allocated with `allocate`.
    Ok(unsafe { take(p, n) })
}

/// Asks the host to call the root context's `on_tick` every `ms` milliseconds.
pub fn set_tick_period_ms(ms: u32) -> Result<(), Status> {
    // SAFETY: plain value.
    check(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Sends an HTTP request to a host cluster; the answer comes to the root context's
/// `on_http_call_response` with the returned token.
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: std::time::Duration,
) -> Result<u32, Status> {
    let h = header_map::serialize(headers);
    let trailers = header_map::serialize(&[]);
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    let mut token = 0u32;
    // SAFETY: pointers and lengths describe live buffers; `token` is a valid out-pointer.
    check(unsafe {
        proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            h.as_ptr(),
            h.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// The `:status` of the `http_call` response being delivered (0 when absent).
pub fn http_call_response_status() -> u32 {
    header_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One request header, if present.
pub fn request_header(key: &str) -> Result<Option<String>, Status> {
    header_value(MapType::HttpRequestHeaders, key)
}

fn header_value(map: MapType, key: &str) -> Result<Option<String>, Status> {
    let mut p: *mut u8 = std::ptr::null_mut();
    let mut n: usize = 0;
    // SAFETY: valid out-pointers; `key` is a live string.
    let s =
        unsafe { proxy_get_header_map_value(map as u32, key.as_ptr(), key.len(), &mut p, &mut n) };
    match check(s) {
        // SAFETY: the host returned a buffer it allocated with `allocate`.
        Ok(()) => String::from_utf8(unsafe { take(p, n) })
            .map(Some)
            .map_err(|_| Status::SerializationFailure),
        Err(Status::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets (replaces) a request header.
pub fn set_request_header(key: &str, value: &str) -> Result<(), Status> {
    // SAFETY: pointers and lengths describe live strings.
    check(unsafe {
        proxy_replace_header_map_value(
            MapType::HttpRequestHeaders as u32,
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes a request header.
pub fn remove_request_header(key: &str) -> Result<(), Status> {
    // SAFETY: pointer and length describe `key`.
    check(unsafe {
        proxy_remove_header_map_value(MapType::HttpRequestHeaders as u32, key.as_ptr(), key.len())
    })
}

/// Answers the request locally.
pub fn send_local_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), Status> {
    let h = header_map::serialize(headers);
    // SAFETY: pointers and lengths describe live buffers.
    check(unsafe {
        proxy_send_local_response(
            status,
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            h.as_ptr(),
            h.len(),
            -1,
        )
    })
}

/// Reads shared data: the value (if present) and its CAS (0 when absent).
pub fn get_shared_data(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let mut p: *mut u8 = std::ptr::null_mut();
    let mut n: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: valid out-pointers; `key` is a live string.
    let s = unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), &mut p, &mut n, &mut cas) };
    match check(s) {
        // SAFETY: the host returned a buffer it allocated with `allocate`.
        Ok(()) => Ok((Some(unsafe { take(p, n) }), cas)),
        Err(Status::NotFound) => Ok((None, 0)),
        Err(e) => Err(e),
    }
}

/// Writes shared data if `cas` is 0 or matches.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<(), Status> {
    // SAFETY: pointers and lengths describe live buffers.
    check(unsafe {
        proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// Defines a metric of type `kind`; returns its id.
fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: pointer/length describe `name`; `id` is a valid out-pointer.
    check(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

/// Defines a counter.
pub fn define_counter(name: &str) -> Result<u32, Status> {
    define_metric(MetricType::Counter, name)
}

/// Adds to a counter.
pub fn increment(id: u32, by: i64) -> Result<(), Status> {
    // SAFETY: plain values.
    check(unsafe { proxy_increment_metric(id, by) })
}

/// Defines a histogram (Envoy: a stat with quantiles); returns its id.
pub fn define_histogram(name: &str) -> Result<u32, Status> {
    define_metric(MetricType::Histogram, name)
}

/// Records one value in a histogram.
pub fn record(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: plain values.
    check(unsafe { proxy_record_metric(id, value) })
}
