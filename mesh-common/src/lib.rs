//! Types shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding, because the same bytes are
//! read by the BPF verifier-checked programs and by user space through `aya` maps. Addresses are
//! stored as octets in network order (`[u8; 4]` / `[u8; 16]`); ports are stored in host order.
#![no_std]

/// Port of the agent's outbound listener, bound on loopback inside every meshed task's netns.
pub const OUTBOUND_PORT: u16 = 15001;

/// Address family tags stored in map values (same numbers as the kernel's `AF_INET*`).
pub const FAMILY_V4: u16 = 2;
pub const FAMILY_V6: u16 = 10;

/// Capacity of the maps that carry original destinations from `connect` to `accept`.
/// Entries live from a captured `connect()` until the agent accepts the connection (microseconds),
/// and the maps are LRU, so a burst larger than this can only evict the oldest, already-stale
/// entries.
pub const ORIGINAL_DST_MAP_ENTRIES: u32 = 65_536;
/// Capacity of the exact `ip:port` destination maps and the CIDR tries.
pub const RULE_MAP_ENTRIES: u32 = 16_384;
/// Capacity of the excluded-ports map.
pub const EXCLUDED_PORT_ENTRIES: u32 = 1_024;

/// The original destination of a captured connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// IPv4 in the first four octets (rest zero) or IPv6, network order.
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u16,
    pub _pad: u32,
}

/// Identifies an accepted connection from the agent's side: the netns the listener lives in and
/// the client's source port. A source port is unique per netns and family while the connection
/// exists, and the agent learns both values from its own sockets (`SO_NETNS_COOKIE` on the
/// listener, the peer port from `accept`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// Client (task side) source port, host order.
    pub client_port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Exact IPv4 destination rule key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DestV4 {
    pub addr: [u8; 4],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
}

/// Exact IPv6 destination rule key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DestV6 {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Node-wide capture settings, element 0 of the `SETTINGS` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Bit set of `SETTINGS_*` flags.
    pub flags: u32,
    /// Host order; [`OUTBOUND_PORT`] unless configured otherwise.
    pub outbound_port: u16,
    pub _pad: u16,
    /// The agent's thread-group id in the initial pid namespace. The agent never sits in a task
    /// cgroup, so this is a second, independent guard against capturing its own sockets.
    pub agent_tgid: u32,
    pub _pad2: u32,
}

/// Capture every TCP destination that is not excluded, not just the listed ones.
pub const SETTINGS_CAPTURE_ALL: u32 = 1 << 0;
/// Settings have been written by the agent. Until then the programs capture nothing.
pub const SETTINGS_READY: u32 = 1 << 1;
/// Put both ends of the app <-> agent loopback connections into `SOCKETS`, so that `sk_msg`
/// hands each write straight to the peer socket's receive queue instead of sending it through
/// the loopback TCP stack. Only connections established while the flag is set are affected.
pub const SETTINGS_LOOPBACK_REDIRECT: u32 = 1 << 2;

/// Capacity of the socket map used by the loopback redirect (each redirected connection holds
/// two entries) and of the map of its sockets that must keep sending over TCP. A full map only
/// means a connection keeps using loopback TCP.
pub const SOCKET_MAP_ENTRIES: u32 = 65_536;
/// Capacity of the maps that carry an agent socket from just before its `connect()` to the
/// connection being established (`AGENT_DIALS`) and from there to the peer's end being
/// established (`AGENT_PEERS`): dials in flight, microseconds to a connect timeout each. Both
/// are LRU (preallocated kernel memory, hence small): a burst beyond this only evicts the
/// oldest, and an evicted entry only means that connection is not redirected.
pub const HANDSHAKE_MAP_ENTRIES: u32 = 4_096;

/// One end of a TCP connection, as both ends and `sk_msg` can compute it: the netns and the
/// four-tuple seen from this socket. IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`), so a
/// dual-stack socket and a plain IPv4 socket of one connection agree. The peer's key is this one
/// with local and remote swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns_cookie: u64,
    /// Network order.
    pub local_ip: [u8; 16],
    /// Network order.
    pub remote_ip: [u8; 16],
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    #[inline(always)]
    pub fn peer(&self) -> SockKey {
        SockKey {
            netns_cookie: self.netns_cookie,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Entries of `READY_NETNS`: task netns whose outbound listeners are up.
pub const READY_NETNS_ENTRIES: u32 = 16_384;
/// `READY_NETNS` value bits: which outbound listeners exist in that netns.
pub const NETNS_LISTENER_V4: u32 = 1 << 0;
pub const NETNS_LISTENER_V6: u32 = 1 << 1;

/// Indices of the per-CPU `STATS` array: what the connect hooks decided, and what happened to
/// original destinations.
pub mod stat {
    pub const CAPTURED: u32 = 0;
    pub const BYPASS_NOT_TCP: u32 = 1;
    pub const BYPASS_LOOPBACK: u32 = 2;
    pub const BYPASS_ECS_ENDPOINT: u32 = 3;
    pub const BYPASS_EXCLUDED_PORT: u32 = 4;
    pub const BYPASS_EXCLUDED_CIDR: u32 = 5;
    pub const BYPASS_NOT_MESHED: u32 = 6;
    pub const BYPASS_AGENT: u32 = 7;
    pub const BYPASS_NOT_READY: u32 = 8;
    pub const ORIGINAL_DST_RECORDED: u32 = 9;
    pub const ORIGINAL_DST_SAVE_FAILED: u32 = 10;
    /// Would have been captured, but the agent's listener in the socket's netns is not up yet
    /// (the task's cgroup got programs before its first process created the netns).
    pub const BYPASS_NO_LISTENER: u32 = 11;
    /// A loopback-leg socket was put into the redirect map (two per redirected connection).
    pub const REDIRECT_SOCKET_ADDED: u32 = 12;
    /// A socket could not be put into the redirect map (full, or the kernel refused it): that
    /// connection keeps using loopback TCP. Also counts a send refused because the map of
    /// sockets that must keep using TCP was full (never expected: it is as large as the
    /// redirect map).
    pub const REDIRECT_ADD_FAILED: u32 = 13;
    /// A redirected socket wrote before its peer was in the map (or after the peer closed); that
    /// direction of the connection stays on TCP from then on, so bytes cannot overtake each other.
    pub const REDIRECT_PEER_MISSING: u32 = 14;
    /// Number of slots; keep in step with [`NAMES`].
    pub const COUNT: u32 = 15;

    /// Metric label for each slot, indexed by the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "captured",
        "bypass_not_tcp",
        "bypass_loopback",
        "bypass_ecs_endpoint",
        "bypass_excluded_port",
        "bypass_excluded_cidr",
        "bypass_not_meshed",
        "bypass_agent",
        "bypass_not_ready",
        "original_dst_recorded",
        "original_dst_save_failed",
        "bypass_no_listener",
        "redirect_socket_added",
        "redirect_add_failed",
        "redirect_peer_missing",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, contain only integers and byte arrays, and have
    // explicit padding fields, so every bit pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::DestV4 {}
    unsafe impl aya::Pod for super::DestV6 {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::SockKey {}
}

// The kernel and user space must agree on these layouts byte for byte; a field change that
// alters a size must be deliberate (and both sides rebuilt together, which the embedded object
// guarantees).
const _: () = {
    assert!(core::mem::size_of::<OriginalDst>() == 24);
    assert!(core::mem::size_of::<ConnKey>() == 16);
    assert!(core::mem::size_of::<DestV4>() == 8);
    assert!(core::mem::size_of::<DestV6>() == 24);
    assert!(core::mem::size_of::<Settings>() == 16);
    assert!(core::mem::size_of::<SockKey>() == 48);
};
