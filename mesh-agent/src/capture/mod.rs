//! Capture: loads the kernel programs, keeps the capture rules in their maps, attaches them to
//! task cgroups, answers "where was this accepted connection going?", and puts the optional
//! loopback redirect in place (`redirect.rs`).
//!
//! Nothing is pinned in bpffs. Every cgroup attachment is a BPF link owned by this process, and
//! the redirect's `sk_msg` program is attached to a map only this process holds, so the kernel
//! detaches everything when the agent exits, even if it is killed: a crashed agent can not leave
//! tasks redirected to a listener (or a socket map) that no longer exists.

mod redirect;
mod rules;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Context, anyhow};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, ProgramError, SkMsg, SockOps,
    cgroup_sock_addr::CgroupSockAddrLinkId, sock_ops::SockOpsLinkId,
};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{
    ConnKey, FAMILY_V4, FAMILY_V6, OriginalDst, SETTINGS_CAPTURE_ALL, SETTINGS_LOOPBACK_REDIRECT,
    SETTINGS_READY, Settings, SockKey, stat,
};
use tracing::{info, warn};

use crate::config::{CaptureMode, CaptureSettings};

/// The compiled `mesh-ebpf` object, embedded by build.rs so the binary is the whole product.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

const PROG_SOCK_OPS: &str = "record_original_dst";
/// cgroup sock_addr programs per family, in attach order: `getpeername` before `connect`, so a
/// socket is never captured without its peer address being restored.
const SOCK_ADDR_V4: [&str; 2] = ["restore_peer4", "capture_connect4"];
const SOCK_ADDR_V6: [&str; 2] = ["restore_peer6", "capture_connect6"];
/// The loopback redirect: `sock_ops` for the agent's own cgroup, `sk_msg` for the socket map.
const PROG_AGENT_SOCK_OPS: &str = "redirect_agent_sockets";
const PROG_SK_MSG: &str = "redirect_to_peer";
/// The ring buffer the programs' aya-log records go through, defined by aya-log-ebpf at 128 KiB.
const KERNEL_LOG_RING: &str = "AYA_LOGS";

/// Loaded programs and maps. One per agent.
pub struct Capture {
    /// Programs (for attach/detach) and the rule maps; changed only on setup and reload.
    control: Mutex<Ebpf>,
    /// The accept path's map, kept apart so lookups never wait behind a reload.
    dst_by_conn: Mutex<HashMap<MapData, ConnKey, OriginalDst>>,
    /// Which task netns have outbound listeners; the connect hooks capture only there.
    ready_netns: Mutex<HashMap<MapData, u64, u32>>,
    stats: PerCpuArray<MapData, u64>,
    /// Sockets the agent made in task netns (by cookie), so the kernel can tell the agent's
    /// dials from other sockets; see [`Capture::register_dial`].
    agent_dials: Mutex<HashMap<MapData, u64, u8>>,
    cgroup2_root: PathBuf,
    /// Where the loopback redirect stands (`REDIRECT_*`). Its programs are attached on the first
    /// configuration that asks for it and stay attached (switching it off only clears the
    /// settings flag); changed only under the `control` lock. Read for every socket a netns
    /// worker hands out: while attached, sockets are registered even with the redirect switched
    /// off (the kernel checks the switch when the connection is established).
    redirect: AtomicU8,
}

const REDIRECT_NOT_ATTACHED: u8 = 0;
const REDIRECT_ATTACHED: u8 = 1;
/// The kernel refused a program or an attachment; said once, not retried.
const REDIRECT_UNAVAILABLE: u8 = 2;

/// The programs attached to one task cgroup; give it back to [`Capture::detach`].
#[derive(Debug)]
pub struct Attachment {
    cgroup: PathBuf,
    sock_ops: SockOpsLinkId,
    /// In attach order.
    sock_addr: Vec<(&'static str, CgroupSockAddrLinkId)>,
}

impl Capture {
    /// Loads and verifies every program. `kernel_log_level` is the aya-log level compiled into
    /// the programs' log statements (0 = off, 4 = debug).
    pub fn load(kernel_log_level: u8, cgroup2_root: &Path) -> anyhow::Result<Capture> {
        let mut loader = EbpfLoader::new();
        loader.override_global("AYA_LOG_LEVEL", &kernel_log_level, true);
        if kernel_log_level == 0 {
            // With logging off the programs never write a record, and nobody reads the ring
            // (see `take_kernel_logger`): one page instead of 128 KiB of kernel memory, which a
            // reader would also map twice (264 KiB of the agent's RSS).
            loader.map_max_entries(KERNEL_LOG_RING, page_size());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| anyhow!("cannot load the embedded eBPF object: {e}"))?;
        for name in SOCK_ADDR_V4.into_iter().chain(SOCK_ADDR_V6) {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| load_error(name, e))?;
        }
        let prog: &mut SockOps = program(&mut ebpf, PROG_SOCK_OPS)?;
        prog.load().map_err(|e| load_error(PROG_SOCK_OPS, e))?;

        let dst_by_conn = HashMap::try_from(take_map(&mut ebpf, "DST_BY_CONN")?)?;
        let ready_netns = HashMap::try_from(take_map(&mut ebpf, "READY_NETNS")?)?;
        let stats = PerCpuArray::try_from(take_map(&mut ebpf, "STATS")?)?;
        let agent_dials = HashMap::try_from(take_map(&mut ebpf, "AGENT_DIALS")?)?;
        Ok(Capture {
            control: Mutex::new(ebpf),
            dst_by_conn: Mutex::new(dst_by_conn),
            ready_netns: Mutex::new(ready_netns),
            stats,
            agent_dials: Mutex::new(agent_dials),
            cgroup2_root: cgroup2_root.to_owned(),
            redirect: AtomicU8::new(REDIRECT_NOT_ATTACHED),
        })
    }

    /// Forwards the programs' aya-log records to this process's `log`/`tracing` output. Only
    /// worth calling when they were loaded with a log level above 0.
    pub fn take_kernel_logger(&self) -> anyhow::Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        let mut ebpf = self.control.lock().unwrap_or_else(|p| p.into_inner());
        aya_log::EbpfLogger::init(&mut ebpf).context("cannot read the eBPF programs' log buffer")
    }

    /// Makes the kernel rules equal to `settings`. New entries go in before stale ones leave, so
    /// a reload never opens a window in which a still-wanted destination is not captured.
    pub fn apply_rules(
        &self,
        settings: &CaptureSettings,
        outbound_port: u16,
    ) -> anyhow::Result<()> {
        let mut ebpf = self.control.lock().unwrap_or_else(|p| p.into_inner());
        rules::apply(&mut ebpf, settings).context("cannot update the capture rule maps")?;
        let mut flags = SETTINGS_READY;
        if settings.mode == CaptureMode::All {
            flags |= SETTINGS_CAPTURE_ALL;
        }
        if settings.loopback_redirect && self.redirect_in_place(&mut ebpf) {
            flags |= SETTINGS_LOOPBACK_REDIRECT;
        }
        let node = Settings {
            flags,
            outbound_port,
            _pad: 0,
            agent_tgid: std::process::id(),
            _pad2: 0,
        };
        let mut array: Array<_, Settings> = Array::try_from(
            ebpf.map_mut("SETTINGS")
                .ok_or_else(|| anyhow!("eBPF object has no SETTINGS map"))?,
        )?;
        array
            .set(0, node, 0)
            .context("cannot write the SETTINGS map")?;
        Ok(())
    }

    /// Attaches the loopback redirect's programs unless they are already in place (or the kernel
    /// refused them before). Returns whether they are in place. A refusal is a warning, not an
    /// error: connections then use loopback TCP, as with the redirect switched off.
    /// Called under the `control` lock (`ebpf` is its guard), which serialises attaching.
    fn redirect_in_place(&self, ebpf: &mut Ebpf) -> bool {
        match self.redirect.load(Ordering::Acquire) {
            REDIRECT_ATTACHED => return true,
            REDIRECT_UNAVAILABLE => return false,
            _ => {}
        }
        match attach_redirect(ebpf, &self.cgroup2_root) {
            Ok(cgroup) => {
                self.redirect.store(REDIRECT_ATTACHED, Ordering::Release);
                info!(agent_cgroup = %cgroup.display(), "loopback redirect in place: writes on the app <-> agent loopback legs go straight to the peer socket");
                true
            }
            Err(e) => {
                self.redirect.store(REDIRECT_UNAVAILABLE, Ordering::Release);
                warn!(error = %format!("{e:#}"), "loopback redirect unavailable; the app <-> agent legs use loopback TCP (capture.loopback_redirect has no effect)");
                false
            }
        }
    }

    /// Records a socket the agent made in a task netns, before it connects: if it connects to
    /// the task's own app, the kernel redirects that loopback leg (when the redirect is on).
    /// Costs two system calls per connect, and nothing unless the redirect was ever switched
    /// on. Failures only mean that connection is not redirected.
    pub fn register_dial(&self, socket: &impl AsRawFd) {
        if self.redirect.load(Ordering::Acquire) != REDIRECT_ATTACHED {
            return;
        }
        let Ok(cookie) = crate::netns::socket_cookie(socket) else {
            return;
        };
        let mut map = self.agent_dials.lock().unwrap_or_else(|p| p.into_inner());
        let _ = map.insert(cookie, 1, 0);
    }

    /// Tells the connect hooks that the outbound listeners of the netns with this cookie are up
    /// (`v6`: also the IPv6 one). Until then, and for a family without a listener, connects in
    /// that netns go direct rather than to a closed port.
    pub fn listeners_ready(&self, netns_cookie: u64, v6: bool) -> anyhow::Result<()> {
        let mut bits = mesh_common::NETNS_LISTENER_V4;
        if v6 {
            bits |= mesh_common::NETNS_LISTENER_V6;
        }
        let mut map = self.ready_netns.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(netns_cookie, bits, 0)
            .context("cannot record the listeners in the READY_NETNS map (is it full?)")
    }

    /// Forgets a netns whose listeners are closing.
    pub fn listeners_gone(&self, netns_cookie: u64) {
        let mut map = self.ready_netns.lock().unwrap_or_else(|p| p.into_inner());
        let _ = map.remove(&netns_cookie);
    }

    /// Attaches the capture programs (both families) to a task cgroup. They capture nothing in
    /// a netns until [`Capture::listeners_ready`] names it, so programs may be attached before
    /// the task's first process exists.
    pub fn attach(&self, cgroup: &Path) -> anyhow::Result<Attachment> {
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
        let mut ebpf = self.control.lock().unwrap_or_else(|p| p.into_inner());
        let ebpf = &mut *ebpf;
        let context = |what: &str| format!("cannot attach {what} to cgroup {}", cgroup.display());
        // sock_ops first: a connect captured by connect4/6 must find sock_ops in place to record
        // its destination. On any failure, undo what was attached.
        let sock_ops = program::<SockOps>(ebpf, PROG_SOCK_OPS)?
            .attach(dir.as_fd(), CgroupAttachMode::Single)
            .with_context(|| context(PROG_SOCK_OPS))?;
        let mut attachment = Attachment {
            cgroup: cgroup.to_owned(),
            sock_ops,
            sock_addr: Vec::with_capacity(4),
        };
        for &name in SOCK_ADDR_V4.iter().chain(&SOCK_ADDR_V6) {
            // Single means "no attach flags": a BPF link always coexists with other links on the
            // same cgroup (bpf_link_create rejects BPF_F_ALLOW_MULTI), so other tools and a second
            // agent during a rolling update can attach too; a connect already rewritten to
            // loopback is left alone by the next program.
            let attached = program::<CgroupSockAddr>(ebpf, name)
                .and_then(|p| Ok(p.attach(dir.as_fd(), CgroupAttachMode::Single)?));
            match attached {
                Ok(id) => attachment.sock_addr.push((name, id)),
                Err(e) => {
                    let _ = detach_all(ebpf, attachment);
                    return Err(e.context(context(name)));
                }
            }
        }
        Ok(attachment)
    }

    /// Detaches a task's programs. Connections already captured keep working; new connects of
    /// the task go straight to their destination.
    pub fn detach(&self, attachment: Attachment) -> anyhow::Result<()> {
        let mut ebpf = self.control.lock().unwrap_or_else(|p| p.into_inner());
        detach_all(&mut ebpf, attachment)
    }

    /// The original destination of a connection accepted on a task's outbound listener, removed
    /// from the map so entries cannot accumulate. `None` if the kernel recorded nothing (the
    /// connection was not captured, e.g. a direct connect to the listener).
    pub fn take_original_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey {
            netns_cookie,
            client_port: peer.port(),
            family: if peer.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
            _pad: 0,
        };
        let mut map = self.dst_by_conn.lock().unwrap_or_else(|p| p.into_inner());
        let dst = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        original_to_socket_addr(&dst)
    }

    /// Totals of the per-CPU decision counters, indexed by `mesh_common::stat`.
    pub fn stats(&self) -> [u64; stat::COUNT as usize] {
        let mut out = [0u64; stat::COUNT as usize];
        for (slot, total) in out.iter_mut().enumerate() {
            if let Ok(per_cpu) = self.stats.get(&(slot as u32), 0) {
                *total = per_cpu.iter().sum();
            }
        }
        out
    }
}

/// Attaches `sk_msg` to the socket map and the agent-side `sock_ops` to this process's cgroup
/// (both live as long as this process). Returns the cgroup.
fn attach_redirect(ebpf: &mut Ebpf, cgroup2_root: &Path) -> anyhow::Result<PathBuf> {
    let cgroup = redirect::own_cgroup(cgroup2_root)
        .context("cannot find the agent's own cgroup for its sock_ops program")?;
    for name in [PROG_AGENT_SOCK_OPS, PROG_SK_MSG] {
        let loaded = match name {
            PROG_SK_MSG => program::<SkMsg>(ebpf, name)?.load(),
            _ => program::<SockOps>(ebpf, name)?.load(),
        };
        match loaded {
            Ok(()) | Err(ProgramError::AlreadyLoaded) => {}
            Err(e) => return Err(load_error(name, e)),
        }
    }
    let map_fd = {
        let sockets: SockHash<_, SockKey> = SockHash::try_from(
            ebpf.map("SOCKETS")
                .ok_or_else(|| anyhow!("eBPF object has no SOCKETS map"))?,
        )?;
        sockets
            .fd()
            .try_clone()
            .context("cannot duplicate the SOCKETS map fd")?
    };
    program::<SkMsg>(ebpf, PROG_SK_MSG)?
        .attach(&map_fd)
        .context("cannot attach sk_msg to the SOCKETS map")?;
    let dir = std::fs::File::open(&cgroup)
        .with_context(|| format!("cannot open cgroup {}", cgroup.display()))?;
    // Links coexist with other links on the cgroup: other agents (tests, a rolling update).
    program::<SockOps>(ebpf, PROG_AGENT_SOCK_OPS)?
        .attach(dir.as_fd(), CgroupAttachMode::Single)
        .with_context(|| format!("cannot attach sock_ops to cgroup {}", cgroup.display()))?;
    Ok(cgroup)
}

/// The reverse of attach: redirects first, sock_ops last. Tries every link even if one fails.
fn detach_all(ebpf: &mut Ebpf, attachment: Attachment) -> anyhow::Result<()> {
    let mut first_error: Option<anyhow::Error> = None;
    for (name, id) in attachment.sock_addr.into_iter().rev() {
        if let Err(e) = program::<CgroupSockAddr>(ebpf, name).and_then(|p| Ok(p.detach(id)?)) {
            first_error.get_or_insert(e);
        }
    }
    if let Err(e) =
        program::<SockOps>(ebpf, PROG_SOCK_OPS).and_then(|p| Ok(p.detach(attachment.sock_ops)?))
    {
        first_error.get_or_insert(e);
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(e.context(format!(
            "cannot detach programs from cgroup {}",
            attachment.cgroup.display()
        ))),
    }
}

fn original_to_socket_addr(dst: &OriginalDst) -> Option<SocketAddr> {
    let ip = match dst.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(
            dst.addr[0],
            dst.addr[1],
            dst.addr[2],
            dst.addr[3],
        )),
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(dst.addr)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, dst.port))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no program {name}"))?;
    prog.try_into()
        .map_err(|e| anyhow!("eBPF program {name} has an unexpected type: {e}"))
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<aya::maps::Map> {
    ebpf.take_map(name)
        .ok_or_else(|| anyhow!("eBPF object has no map {name}"))
}

/// The smallest ring buffer the kernel accepts is one page (a power of two, page-aligned).
fn page_size() -> u32 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

/// A load failure with the verifier's own explanation, which is what a developer needs.
fn load_error(name: &str, e: ProgramError) -> anyhow::Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => anyhow!(
            "the kernel rejected eBPF program {name}: {io_error}\nverifier log:\n{verifier_log}"
        ),
        other => anyhow!("cannot load eBPF program {name}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destinations_convert_both_families() {
        let mut v4 = OriginalDst {
            addr: [0; 16],
            port: 8080,
            family: FAMILY_V4,
            _pad: 0,
        };
        v4.addr[..4].copy_from_slice(&[198, 18, 0, 3]);
        assert_eq!(
            original_to_socket_addr(&v4),
            Some("198.18.0.3:8080".parse().unwrap())
        );
        let v6 = OriginalDst {
            addr: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
            port: 443,
            family: FAMILY_V6,
            _pad: 0,
        };
        assert_eq!(
            original_to_socket_addr(&v6),
            Some("[2001:db8::1]:443".parse().unwrap())
        );
        let bad = OriginalDst { family: 99, ..v6 };
        assert_eq!(original_to_socket_addr(&bad), None);
    }

    #[test]
    fn a_sockets_peer_key_names_the_other_end_of_the_same_connection() {
        let app = SockKey {
            netns_cookie: 7,
            local_ip: Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets(),
            remote_ip: Ipv4Addr::LOCALHOST.to_ipv6_mapped().octets(),
            local_port: 41804,
            remote_port: 15001,
            _pad: 0,
        };
        let agent = app.peer();
        assert_eq!((agent.local_port, agent.remote_port), (15001, 41804));
        assert_eq!(agent.netns_cookie, 7, "a peer is always in the same netns");
        assert_eq!(agent.peer(), app);
        let delivery = SockKey {
            local_ip: Ipv4Addr::new(198, 18, 2, 2).to_ipv6_mapped().octets(),
            remote_ip: Ipv4Addr::new(198, 18, 1, 2).to_ipv6_mapped().octets(),
            ..app
        };
        assert_eq!(delivery.peer().local_ip, delivery.remote_ip);
        assert_ne!(delivery.peer(), delivery);
    }
}
