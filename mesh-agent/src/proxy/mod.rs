//! The data path: accept a captured connection, find where it was going, connect there, and
//! carry bytes both ways.
//!
//! `outbound` is the seam later capabilities extend: destination resolution (routing, the mutual
//! TLS tunnel to a peer agent) replaces the direct connect, while accept, metrics and the splice
//! stay as they are.

mod outbound;
mod splice;

pub use outbound::{ConnectionSet, OutboundContext, serve_outbound};
