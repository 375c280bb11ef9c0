//! Protobuf types of the gateway's wire contract (`proto/control.proto`,
//! `proto/opportunity.proto`).

#![forbid(unsafe_code)]

/// `package control`: the signed control command.
pub mod control {
    include!(concat!(env!("OUT_DIR"), "/control.rs"));
}

/// `package hotpath`: an opportunity frame for the sender's ingest endpoint.
pub mod hotpath {
    include!(concat!(env!("OUT_DIR"), "/hotpath.rs"));
}

/// The `.proto` source, for tools that need the schema at run time
/// (e.g. ClickHouse's `format_schema`).
pub const CONTROL_PROTO: &str = include_str!("../control.proto");

/// `control.proto` compiled to a `google.protobuf.FileDescriptorSet` (protobuf
/// bytes), for tests that check hand-written wire tables against the schema.
pub const CONTROL_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/control.fds"));
