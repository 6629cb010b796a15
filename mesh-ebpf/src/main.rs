//! Kernel side of the mesh: transparent capture of task sockets.
//!
//! * `cgroup/connect4` and `cgroup/connect6`, attached to every meshed task's cgroup, decide per
//!   TCP `connect()` whether the destination is captured. A captured socket's original
//!   destination is saved under its socket cookie and the destination is rewritten to the
//!   agent's outbound listener on loopback inside the task's own netns.
//! * `sock_ops` sees the captured socket become established and copies the saved destination to
//!   a key the agent can compute from its side of the connection: (netns cookie, client port).
//!   It also asks for the socket's state changes, to forget the destination when it closes.
//! * `cgroup/getpeername4` and `getpeername6` answer `getpeername()` on a captured socket with
//!   the original destination, so the application sees the peer it connected to, not the agent.
//!
//! * Loopback redirect (switchable, `SETTINGS_LOOPBACK_REDIRECT`): the two loopback legs of a
//!   meshed connection (app -> agent outbound listener, agent -> app inbound delivery) have both
//!   ends on this host in one netns. `sock_ops` puts both ends into the `SOCKETS` hash as they
//!   become established, and `sk_msg` (attached to that hash) hands every write straight to the
//!   peer socket's receive queue, skipping the loopback TCP/IP stack. The app-side ends are
//!   seen by the task cgroup's `record_original_dst`; the agent-side ends by
//!   `redirect_agent_sockets`, attached to the agent's own cgroup.
//!
//! The programs never refuse a connect: on any internal failure the connection simply goes to its
//! original destination uncaptured (fail open) and a counter says so.
#![no_std]
#![no_main]

use core::ffi::c_void;
use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, bpf_sock_addr, sk_action,
    },
    helpers::{bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use mesh_common::{
    ConnKey, DestV4, DestV6, EXCLUDED_PORT_ENTRIES, FAMILY_V4, FAMILY_V6, HANDSHAKE_MAP_ENTRIES,
    NETNS_LISTENER_V4, NETNS_LISTENER_V6, ORIGINAL_DST_MAP_ENTRIES, OriginalDst,
    READY_NETNS_ENTRIES, RULE_MAP_ENTRIES, SETTINGS_CAPTURE_ALL, SETTINGS_LOOPBACK_REDIRECT,
    SETTINGS_READY, SOCKET_MAP_ENTRIES, Settings, SockKey, stat,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `connect` hook verdict: let the (possibly rewritten) connect proceed.
const ALLOW: i32 = 1;

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Task netns (by netns cookie) whose outbound listeners the agent has bound, with which
/// families. Programs are attached to a task's cgroup as soon as it exists, before the task's
/// netns does; until the agent has a listener there, connects go direct instead of to a closed
/// port.
#[map]
static READY_NETNS: HashMap<u64, u32> = HashMap::with_max_entries(READY_NETNS_ENTRIES, 0);

/// Exact `ip:port` destinations to capture.
#[map]
static CAPTURE_DEST_V4: HashMap<DestV4, u8> = HashMap::with_max_entries(RULE_MAP_ENTRIES, 0);
#[map]
static CAPTURE_DEST_V6: HashMap<DestV6, u8> = HashMap::with_max_entries(RULE_MAP_ENTRIES, 0);

/// Networks whose every port is captured.
#[map]
static CAPTURE_NET_V4: LpmTrie<[u8; 4], u8> =
    LpmTrie::with_max_entries(RULE_MAP_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static CAPTURE_NET_V6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(RULE_MAP_ENTRIES, BPF_F_NO_PREALLOC);

/// Networks and ports never captured; they win over every capture rule.
#[map]
static EXCLUDE_NET_V4: LpmTrie<[u8; 4], u8> =
    LpmTrie::with_max_entries(RULE_MAP_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static EXCLUDE_NET_V6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(RULE_MAP_ENTRIES, BPF_F_NO_PREALLOC);
#[map]
static EXCLUDE_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(EXCLUDED_PORT_ENTRIES, 0);

/// Original destination by socket cookie, for the captured socket's whole life (getpeername
/// needs it). Deleted when the socket closes; LRU so connects that never complete cannot fill it.
#[map]
static DST_BY_COOKIE: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(ORIGINAL_DST_MAP_ENTRIES, 0);

/// Original destination by (netns cookie, client port), read and deleted by the agent on accept.
#[map]
static DST_BY_CONN: LruHashMap<ConnKey, OriginalDst> =
    LruHashMap::with_max_entries(ORIGINAL_DST_MAP_ENTRIES, 0);

/// Both ends of redirected loopback legs, by [`SockKey`]. `redirect_to_peer` runs on every write
/// of a socket in this map. The kernel removes a socket when it closes.
#[map]
static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(SOCKET_MAP_ENTRIES, 0);

/// Sockets of the agent (by socket cookie) that it will connect to a task's own app: registered
/// by the agent when it makes the socket, consumed when the connection is established.
#[map]
static AGENT_DIALS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(HANDSHAKE_MAP_ENTRIES, 0);

/// App-side keys of connections whose agent end is in `SOCKETS`, waiting for the app's accepted
/// socket to be established (it always is after the agent's end).
#[map]
static AGENT_PEERS: LruHashMap<SockKey, u8> =
    LruHashMap::with_max_entries(HANDSHAKE_MAP_ENTRIES, 0);

/// Redirected sockets that wrote while their peer was not in `SOCKETS`: those bytes went over
/// TCP, so every later write of that socket must too, or it could overtake them (the receiver
/// reads redirected data before TCP data). Removed when the socket closes.
#[map]
static SEND_VIA_TCP: HashMap<SockKey, u8> =
    HashMap::with_max_entries(SOCKET_MAP_ENTRIES, BPF_F_NO_PREALLOC);

#[inline(always)]
fn count(slot: u32) {
    if let Some(p) = STATS.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race with us.
        unsafe { *p += 1 };
    }
}

/// Why a connect was not captured, or `CAPTURED`.
type Verdict = u32;

/// Checks shared by both families that come before looking at the destination.
#[inline(always)]
fn precheck(sa: &bpf_sock_addr) -> Result<Settings, Verdict> {
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Err(stat::BYPASS_NOT_TCP);
    }
    let settings = match SETTINGS.get(0) {
        Some(s) if s.flags & SETTINGS_READY != 0 => *s,
        _ => return Err(stat::BYPASS_NOT_READY),
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == settings.agent_tgid {
        return Err(stat::BYPASS_AGENT);
    }
    Ok(settings)
}

/// Whether the agent's listener for `family_bit` is up in the calling socket's netns.
#[inline(always)]
fn listener_ready(ctx: &SockAddrContext, family_bit: u32) -> bool {
    // SAFETY: the helper only reads the context the kernel passed to this program.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut c_void) };
    // SAFETY: a plain read of a u32 map value.
    match unsafe { READY_NETNS.get(&netns) } {
        Some(bits) => bits & family_bit != 0,
        None => false,
    }
}

/// The rule lookup for an IPv4 destination (also used for v4-mapped IPv6 destinations).
#[inline(always)]
fn decide_v4(settings: &Settings, addr: [u8; 4], port: u16) -> Verdict {
    if addr[0] == 127 {
        return stat::BYPASS_LOOPBACK;
    }
    // ECS agent endpoints (credentials, task metadata) and the EC2 instance metadata service.
    if addr == [169, 254, 170, 2] || addr == [169, 254, 169, 254] {
        return stat::BYPASS_ECS_ENDPOINT;
    }
    if EXCLUDE_PORTS.get_ptr(port).is_some() {
        return stat::BYPASS_EXCLUDED_PORT;
    }
    if EXCLUDE_NET_V4.get(Key::new(32, addr)).is_some() {
        return stat::BYPASS_EXCLUDED_CIDR;
    }
    let exact = DestV4 {
        addr,
        port,
        _pad: 0,
    };
    if settings.flags & SETTINGS_CAPTURE_ALL != 0
        || CAPTURE_DEST_V4.get_ptr(exact).is_some()
        || CAPTURE_NET_V4.get(Key::new(32, addr)).is_some()
    {
        return stat::CAPTURED;
    }
    stat::BYPASS_NOT_MESHED
}

#[inline(always)]
fn decide_v6(settings: &Settings, addr: [u8; 16], port: u16) -> Verdict {
    if addr == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1] {
        return stat::BYPASS_LOOPBACK;
    }
    // fd00:ec2::254, the IPv6 instance metadata endpoint.
    if addr
        == [
            0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
        ]
    {
        return stat::BYPASS_ECS_ENDPOINT;
    }
    if EXCLUDE_PORTS.get_ptr(port).is_some() {
        return stat::BYPASS_EXCLUDED_PORT;
    }
    if EXCLUDE_NET_V6.get(Key::new(128, addr)).is_some() {
        return stat::BYPASS_EXCLUDED_CIDR;
    }
    let exact = DestV6 {
        addr,
        port,
        _pad: [0; 6],
    };
    if settings.flags & SETTINGS_CAPTURE_ALL != 0
        || CAPTURE_DEST_V6.get_ptr(exact).is_some()
        || CAPTURE_NET_V6.get(Key::new(128, addr)).is_some()
    {
        return stat::CAPTURED;
    }
    stat::BYPASS_NOT_MESHED
}

/// Saves the original destination under the socket's cookie. On failure the caller must not
/// rewrite: a captured connection without a known destination could not be forwarded.
#[inline(always)]
fn save_original(ctx: &SockAddrContext, dst: &OriginalDst) -> bool {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    DST_BY_COOKIE.insert(cookie, dst, 0).is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let settings = match precheck(sa) {
        Ok(s) => s,
        Err(v) => {
            count(v);
            return ALLOW;
        }
    };
    let addr = sa.user_ip4.to_ne_bytes();
    let port = u16::from_be(sa.user_port as u16);
    let verdict = decide_v4(&settings, addr, port);
    if verdict != stat::CAPTURED {
        count(verdict);
        return ALLOW;
    }
    if !listener_ready(&ctx, NETNS_LISTENER_V4) {
        count(stat::BYPASS_NO_LISTENER);
        return ALLOW;
    }
    let mut orig = [0u8; 16];
    orig[..4].copy_from_slice(&addr);
    let dst = OriginalDst {
        addr: orig,
        port,
        family: FAMILY_V4,
        _pad: 0,
    };
    if !save_original(&ctx, &dst) {
        count(stat::ORIGINAL_DST_SAVE_FAILED);
        return ALLOW;
    }
    sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    sa.user_port = u32::from(settings.outbound_port.to_be());
    count(stat::CAPTURED);
    debug!(
        &ctx,
        "captured connect4 to {:i}:{}",
        u32::from_be(u32::from_ne_bytes(addr)),
        port
    );
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let settings = match precheck(sa) {
        Ok(s) => s,
        Err(v) => {
            count(v);
            return ALLOW;
        }
    };
    let words = sa.user_ip6;
    let mut addr = [0u8; 16];
    addr[0..4].copy_from_slice(&words[0].to_ne_bytes());
    addr[4..8].copy_from_slice(&words[1].to_ne_bytes());
    addr[8..12].copy_from_slice(&words[2].to_ne_bytes());
    addr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    let port = u16::from_be(sa.user_port as u16);

    // A dual-stack socket connecting to ::ffff:a.b.c.d is an IPv4 connection: same rules, and it
    // is redirected to the IPv4 listener through ::ffff:127.0.0.1.
    let v4_mapped = addr[..10] == [0; 10] && addr[10] == 0xff && addr[11] == 0xff;
    let (verdict, dst) = if v4_mapped {
        let v4 = [addr[12], addr[13], addr[14], addr[15]];
        let mut orig = [0u8; 16];
        orig[..4].copy_from_slice(&v4);
        (
            decide_v4(&settings, v4, port),
            OriginalDst {
                addr: orig,
                port,
                family: FAMILY_V4,
                _pad: 0,
            },
        )
    } else {
        (
            decide_v6(&settings, addr, port),
            OriginalDst {
                addr,
                port,
                family: FAMILY_V6,
                _pad: 0,
            },
        )
    };
    if verdict != stat::CAPTURED {
        count(verdict);
        return ALLOW;
    }
    let listener = if v4_mapped {
        NETNS_LISTENER_V4
    } else {
        NETNS_LISTENER_V6
    };
    if !listener_ready(&ctx, listener) {
        count(stat::BYPASS_NO_LISTENER);
        return ALLOW;
    }
    if !save_original(&ctx, &dst) {
        count(stat::ORIGINAL_DST_SAVE_FAILED);
        return ALLOW;
    }
    sa.user_ip6 = if v4_mapped {
        [
            0,
            0,
            u32::from_be(0xffff),
            u32::from_ne_bytes([127, 0, 0, 1]),
        ]
    } else {
        [0, 0, 0, u32::from_be(1)]
    };
    sa.user_port = u32::from(settings.outbound_port.to_be());
    count(stat::CAPTURED);
    debug!(&ctx, "captured connect6 (v4-mapped: {})", v4_mapped as u8);
    ALLOW
}

#[sock_ops]
pub fn record_original_dst(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        // Only captured sockets asked for state callbacks (below).
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
            let _ = DST_BY_COOKIE.remove(&cookie);
            forget_closed(&ctx);
        }
        return 1;
    }
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // The app accepted a connection: redirected if the agent's dialling end is waiting.
        if redirect_settings().is_some() {
            if let Some(mut key) = ops_key(&ctx) {
                if AGENT_PEERS.get_ptr(&key).is_some() {
                    let _ = AGENT_PEERS.remove(&key);
                    add_to_redirect(&ctx, &mut key);
                }
            }
        }
        return 1;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let raw = ctx.ops as *mut c_void;
    let cookie = unsafe { bpf_get_socket_cookie(raw) };
    // Copied out: a map value may change under us once the map is updated elsewhere.
    let dst = match unsafe { DST_BY_COOKIE.get(&cookie) } {
        Some(d) => *d,
        None => return 1, // not a captured socket
    };
    // The agent's listener family: a v4-mapped connection lands on the IPv4 listener.
    let family = match (ctx.family(), dst.family) {
        (AF_INET, _) => FAMILY_V4,
        (AF_INET6, FAMILY_V4) => FAMILY_V4,
        (AF_INET6, _) => FAMILY_V6,
        _ => return 1,
    };
    let key = ConnKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(raw) },
        client_port: ctx.local_port() as u16,
        family,
        _pad: 0,
    };
    if DST_BY_CONN.insert(&key, &dst, 0).is_ok() {
        count(stat::ORIGINAL_DST_RECORDED);
    } else {
        count(stat::ORIGINAL_DST_SAVE_FAILED);
    }
    // Ask for state changes of this socket only, to delete its cookie entry on close.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    // The app's end of the outbound leg; the agent's accepted end follows (it needs our ACK).
    if redirect_settings().is_some() {
        if let Some(mut key) = ops_key(&ctx) {
            add_to_redirect(&ctx, &mut key);
        }
    }
    1
}

/// The saved original destination of a captured socket, if this is one.
#[inline(always)]
fn original_of(ctx: &SockAddrContext) -> Option<OriginalDst> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut c_void) };
    unsafe { DST_BY_COOKIE.get(&cookie) }.copied()
}

#[cgroup_sock_addr(getpeername4)]
pub fn restore_peer4(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_of(&ctx) {
        if dst.family == FAMILY_V4 {
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = u32::from_ne_bytes([dst.addr[0], dst.addr[1], dst.addr[2], dst.addr[3]]);
            sa.user_port = u32::from(dst.port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn restore_peer6(ctx: SockAddrContext) -> i32 {
    if let Some(dst) = original_of(&ctx) {
        let sa = unsafe { &mut *ctx.sock_addr };
        let a = dst.addr;
        sa.user_ip6 = if dst.family == FAMILY_V4 {
            [
                0,
                0,
                u32::from_be(0xffff),
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            ]
        } else {
            [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ]
        };
        sa.user_port = u32::from(dst.port.to_be());
    }
    ALLOW
}

/// The settings, if the loopback redirect is switched on (read per established connection, so a
/// reload takes effect for new connections).
#[inline(always)]
fn redirect_settings() -> Option<Settings> {
    match SETTINGS.get(0) {
        Some(s) if s.flags & SETTINGS_READY != 0 && s.flags & SETTINGS_LOOPBACK_REDIRECT != 0 => {
            Some(*s)
        }
        _ => None,
    }
}

/// An IPv4 address as the kernel's context gives it (network order, read as a native u32),
/// v4-mapped.
#[inline(always)]
fn mapped_v4(ip4: u32) -> [u8; 16] {
    let b = ip4.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

#[inline(always)]
fn v6_octets(words: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The remote port of a sock_ops or sk_msg context. The kernel stores it in network order and,
/// on little-endian machines, shifted into the upper half of the u32 (older kernels left it in
/// the lower half); whichever half holds it, the other is zero.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    u16::from_be(((raw >> 16) as u16) | (raw as u16))
}

#[inline(always)]
fn is_loopback(ip: &[u8; 16]) -> bool {
    let v4_mapped_127 = ip[..10] == [0; 10] && ip[10] == 0xff && ip[11] == 0xff && ip[12] == 127;
    v4_mapped_127 || *ip == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
}

/// The [`SockKey`] of the socket behind a `bpf_sock_ops` or `sk_msg_md` context pointer (both
/// have the same field names), or `None` for a family other than IPv4/IPv6.
///
/// Every field is read on its own, before any branch, at a constant offset from the context
/// pointer: the verifier rejects reads through a derived pointer, which the compiler makes of
/// copied arrays or of reads it shares between branches. A macro rather than a function
/// because the two context types have no common trait.
macro_rules! sock_key {
    ($ctx:expr) => {{
        let ctx = $ctx;
        // SAFETY: `ctx` is the context pointer the kernel passed to this program; the helper
        // only reads it.
        let (family, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port_raw) = unsafe {
            (
                read_volatile(&(*ctx).family),
                read_volatile(&(*ctx).local_ip4),
                read_volatile(&(*ctx).remote_ip4),
                [
                    read_volatile(&(*ctx).local_ip6[0]),
                    read_volatile(&(*ctx).local_ip6[1]),
                    read_volatile(&(*ctx).local_ip6[2]),
                    read_volatile(&(*ctx).local_ip6[3]),
                ],
                [
                    read_volatile(&(*ctx).remote_ip6[0]),
                    read_volatile(&(*ctx).remote_ip6[1]),
                    read_volatile(&(*ctx).remote_ip6[2]),
                    read_volatile(&(*ctx).remote_ip6[3]),
                ],
                read_volatile(&(*ctx).local_port),
                read_volatile(&(*ctx).remote_port),
            )
        };
        match family {
            AF_INET => Some((mapped_v4(local_ip4), mapped_v4(remote_ip4))),
            AF_INET6 => Some((v6_octets(local_ip6), v6_octets(remote_ip6))),
            _ => None,
        }
        .map(|(local_ip, remote_ip)| SockKey {
            // SAFETY: as above.
            netns_cookie: unsafe { bpf_get_netns_cookie(ctx as *mut c_void) },
            local_ip,
            remote_ip,
            local_port: local_port as u16,
            remote_port: remote_port(remote_port_raw),
            _pad: 0,
        })
    }};
}

/// This socket's [`SockKey`] as `sock_ops` sees it.
#[inline(always)]
fn ops_key(ctx: &SockOpsContext) -> Option<SockKey> {
    sock_key!(ctx.ops)
}

/// This socket's [`SockKey`] as `sk_msg` sees it.
#[inline(always)]
fn msg_key(ctx: &SkMsgContext) -> Option<SockKey> {
    sock_key!(ctx.msg)
}

/// Puts an established socket into `SOCKETS`, and asks for its state changes so its
/// `SEND_VIA_TCP` entry, if it gets one, is removed when it closes.
#[inline(always)]
fn add_to_redirect(ctx: &SockOpsContext, key: &mut SockKey) {
    // SAFETY: `ops` is the context the kernel passed to this program.
    let ops = unsafe { &mut *ctx.ops };
    if SOCKETS.update(key, ops, BPF_ANY as u64).is_ok() {
        count(stat::REDIRECT_SOCKET_ADDED);
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else {
        count(stat::REDIRECT_ADD_FAILED);
    }
}

/// On close: a socket that had to keep sending over TCP no longer needs its entry.
#[inline(always)]
fn forget_closed(ctx: &SockOpsContext) {
    if let Some(key) = ops_key(ctx) {
        let _ = SEND_VIA_TCP.remove(&key);
    }
}

/// The agent's ends of loopback legs. Attached to the agent's own cgroup (not to tasks), and
/// precise even if that cgroup contains other processes: it acts only on sockets of this agent's
/// task netns, on the accepted side of its outbound listener, or on dials the agent registered.
#[sock_ops]
pub fn redirect_agent_sockets(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        if ctx.arg(1) == BPF_TCP_CLOSE {
            forget_closed(&ctx);
        }
        return 1;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    let Some(settings) = redirect_settings() else {
        return 1;
    };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: the helper only reads the context the kernel passed to this program.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
        if AGENT_DIALS.get_ptr(cookie).is_none() {
            return 1;
        }
        let _ = AGENT_DIALS.remove(&cookie);
        let Some(mut key) = ops_key(&ctx) else {
            return 1;
        };
        // A connection to one of the netns's own addresses: inbound delivery to the task's app.
        // Tunnels and direct connections to other hosts are left alone.
        if key.local_ip != key.remote_ip || !netns_ready(key.netns_cookie) {
            return 1;
        }
        // The app's end is established after this one (it needs our ACK): it looks itself up.
        if AGENT_PEERS.insert(&key.peer(), &1, 0).is_err() {
            count(stat::REDIRECT_ADD_FAILED);
            return 1;
        }
        add_to_redirect(&ctx, &mut key);
    } else {
        let Some(mut key) = ops_key(&ctx) else {
            return 1;
        };
        // Accepted by the agent's outbound listener: the app's end was added by the task's
        // program when it became established, before this end existed.
        if key.local_port == settings.outbound_port
            && is_loopback(&key.local_ip)
            && netns_ready(key.netns_cookie)
        {
            add_to_redirect(&ctx, &mut key);
        }
    }
    1
}

#[inline(always)]
fn netns_ready(netns_cookie: u64) -> bool {
    READY_NETNS.get_ptr(netns_cookie).is_some()
}

/// Every write of a socket in `SOCKETS`: straight into the peer's receive queue when the peer is
/// in the map, else over TCP as usual, and then over TCP for the rest of the socket's life.
#[sk_msg]
pub fn redirect_to_peer(ctx: SkMsgContext) -> u32 {
    const PASS: u32 = sk_action::SK_PASS;
    let Some(key) = msg_key(&ctx) else {
        return PASS;
    };
    if SEND_VIA_TCP.get_ptr(&key).is_some() {
        return PASS;
    }
    let mut peer = key.peer();
    if SOCKETS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == PASS as i64 {
        return PASS;
    }
    // The peer is not (or no longer) in the map. These bytes go over TCP; were a later write
    // redirected, it would be read before them. If that cannot be recorded, refusing the write
    // (the app sees an error) is better than reordering its bytes without anyone knowing.
    if SEND_VIA_TCP.insert(&key, &1, 0).is_err() {
        count(stat::REDIRECT_ADD_FAILED);
        return sk_action::SK_DROP;
    }
    count(stat::REDIRECT_PEER_MISSING);
    PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
