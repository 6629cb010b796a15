//! The mutual-TLS tunnel between agents: HBONE-style HTTP/2 CONNECT over TLS 1.3.
//!
//! The dialling agent presents the source task's workload certificate and requires the
//! destination's expected identity; the receiving agent presents the destination task's
//! certificate, requires an identity of the trust domain, authorizes each stream and connects
//! it to its target (`:authority` = the target's `ip:port`) from inside the destination task's
//! netns. Status 200 means connected, 403 denied by policy, 503 target unreachable.

mod client;
mod hostports;
mod meta;
mod reauth;
mod server;
mod stream;
mod tls;
mod tracked;

use std::time::Duration;

pub use client::{Pool, Source, TunnelError, TunnelStream};
pub use hostports::HostPorts;
pub use meta::{StreamMeta, StreamProtocol};
pub use server::{InboundContext, Scope, serve_inbound};

/// TLS handshake deadline, both directions: a peer that stalls mid-handshake holds a socket
/// and a task, so it gets a short leash.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 flow-control windows. The defaults (64 KiB) would cap one stream at 64 KiB per round
/// trip; these let a single stream fill a fast link while still bounding per-stream buffering.
const H2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The largest header block a peer may send: a CONNECT request carries a handful of headers.
const H2_MAX_HEADER_LIST: u32 = 16 * 1024;
/// The largest DATA frame a peer may send: a splice chunk (32 KiB) fits one frame, so the
/// receiving agent writes a chunk to its socket with one system call, not two.
const H2_MAX_FRAME: u32 = 64 * 1024;
/// Data queued in h2 per stream, waiting for the connection to write it out.
const H2_MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams reset because of a local protocol error before the connection is dropped (a peer
/// provoking resets on purpose costs it its connection).
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Applies the settings both ends share to an h2 client or server builder (the two builder
/// types have the same methods but no common trait), so that neither end can drift from the
/// other.
macro_rules! shared_h2_settings {
    ($builder:expr) => {
        $builder
            .initial_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .max_frame_size(H2_MAX_FRAME)
            .max_send_buffer_size(H2_MAX_SEND_BUFFER)
            .max_local_error_reset_streams(Some(H2_MAX_LOCAL_ERROR_RESETS))
    };
}

/// The dialling side's HTTP/2 settings.
fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    shared_h2_settings!(builder).enable_push(false);
    builder
}

/// The receiving side's HTTP/2 settings; `max_streams` open at once per connection.
fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    shared_h2_settings!(builder).max_concurrent_streams(max_streams);
    builder
}
