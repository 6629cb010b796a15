//! A real DNS server for the tests: dnsmasq (Debian package `dnsmasq-base`) inside a
//! node's network namespace, serving A/AAAA and SRV records the way Cloud Map and Consul
//! DNS do.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use mesh_testbed::Topology;
//! use mesh_testbed::dns::{Dnsmasq, DnsZone, Srv};
//! let topology = Topology::new()?;
//! let node = topology.add_node()?;
//! let zone = DnsZone::new()
//!     .ttl(5)
//!     .local_domain("apps.local")
//!     .host("orders.apps.local", "198.18.2.2".parse()?)
//!     .host("i-1.orders.apps.local", "198.18.2.2".parse()?)
//!     .srv(Srv::new("orders.apps.local", "i-1.orders.apps.local", 8080));
//! // On the node's bridge address, port 53, as a VPC resolver would be; the agent, which
//! // runs in the node's namespace, uses it with `resolver = "198.18.1.1:53"`.
//! let mut dns = Dnsmasq::start(&node, (node.ip(), 53).into(), zone.clone())?;
//! dns.set_zone(zone.host("orders.apps.local", "198.18.2.3".parse()?))?; // SIGHUP
//! # Ok(()) }
//! ```
//!
//! What dnsmasq 2.90 does, and so what this helper does (checked by
//! `tests/dns_discovery.rs`):
//! - A and AAAA records come from a hosts file (`addn-hosts`), SRV records from `srv-host`
//!   lines of the configuration. Both are answered with the TTL of `local-ttl` (0 is
//!   allowed: Consul's default), authoritatively, and an SRV answer carries the targets'
//!   A/AAAA records in its additional section when the zone has them.
//! - SIGHUP re-reads the hosts file but **not** `srv-host` lines, nor `local-ttl`. So
//!   [`Dnsmasq::set_zone`] rewrites the hosts file and sends SIGHUP when only host records
//!   changed, and rewrites the configuration and restarts dnsmasq when SRV records, the
//!   TTL or the local domains changed. Either way it returns only once dnsmasq has read
//!   the new records (it waits for dnsmasq's "read <hosts file>" log line).
//! - A name under a [`DnsZone::local_domain`] that has no records is answered NXDOMAIN,
//!   and a known name without records of the asked type NOERROR with no answer (NODATA),
//!   both without an SOA. A name outside the local domains is REFUSED (there is no upstream
//!   server).
//!
//! Nothing outside the topology is touched: no /etc/hosts, no /etc/resolv.conf, no DHCP,
//! no pid file; configuration, hosts file and log live in the topology's directory. The
//! process runs in the topology's `unmeshed` cgroup and is killed when the [`Dnsmasq`] is
//! dropped, and by the topology's teardown in any case.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::process::Process;
use crate::topology::Node;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// An SRV record: `name` has an instance `target:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Srv {
    /// `orders.apps.local` (Cloud Map) or `_orders._tcp.service.consul` (RFC 2782).
    pub name: String,
    pub target: String,
    pub port: u16,
    pub priority: u16,
    pub weight: u16,
}

impl Srv {
    /// Priority 1, weight 1, as Cloud Map publishes every instance.
    pub fn new(name: &str, target: &str, port: u16) -> Self {
        Self {
            name: name.to_string(),
            target: target.to_string(),
            port,
            priority: 1,
            weight: 1,
        }
    }
}

/// What dnsmasq serves: host (A/AAAA) and SRV records, their TTL, and the domains it is
/// authoritative for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsZone {
    hosts: Vec<(String, IpAddr)>,
    srv: Vec<Srv>,
    ttl: u32,
    local_domains: Vec<String>,
}

impl Default for DnsZone {
    fn default() -> Self {
        Self::new()
    }
}

impl DnsZone {
    /// No records, TTL 60 (Cloud Map's usual), no local domain.
    pub fn new() -> Self {
        Self {
            hosts: Vec::new(),
            srv: Vec::new(),
            ttl: 60,
            local_domains: Vec::new(),
        }
    }

    /// The TTL of every answer, in seconds.
    pub fn ttl(mut self, ttl: u32) -> Self {
        self.ttl = ttl;
        self
    }

    /// A domain dnsmasq answers for by itself: NXDOMAIN for its names without records,
    /// instead of REFUSED.
    pub fn local_domain(mut self, domain: &str) -> Self {
        self.local_domains.push(domain.to_string());
        self
    }

    /// Adds an A (IPv4) or AAAA (IPv6) record; several for one name are all answered.
    pub fn host(mut self, name: &str, ip: IpAddr) -> Self {
        self.hosts.push((name.to_string(), ip));
        self
    }

    /// Removes every host record of `name`.
    pub fn without_host(mut self, name: &str) -> Self {
        self.hosts.retain(|(n, _)| n != name);
        self
    }

    pub fn srv(mut self, record: Srv) -> Self {
        self.srv.push(record);
        self
    }

    /// Removes every SRV record of `name`.
    pub fn without_srv(mut self, name: &str) -> Self {
        self.srv.retain(|s| s.name != name);
        self
    }

    pub fn hosts(&self) -> &[(String, IpAddr)] {
        &self.hosts
    }

    pub fn srv_records(&self) -> &[Srv] {
        &self.srv
    }

    pub fn ttl_secs(&self) -> u32 {
        self.ttl
    }

    /// Names end up in dnsmasq's line-oriented files: refuse anything that could break a
    /// line or a comma-separated field.
    fn check(&self) -> Result<()> {
        let names = self
            .hosts
            .iter()
            .map(|(n, _)| n)
            .chain(self.srv.iter().flat_map(|s| [&s.name, &s.target]))
            .chain(&self.local_domains);
        for name in names {
            ensure!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "DNS name {name:?}: use letters, digits, '-', '_' and '.'"
            );
        }
        Ok(())
    }

    /// The hosts file: one `ip name` line per record.
    fn hosts_file(&self) -> String {
        let mut text = String::new();
        for (name, ip) in &self.hosts {
            let _ = writeln!(text, "{ip} {name}");
        }
        text
    }

    /// Whether going from `self` to `next` needs a restart rather than a SIGHUP.
    fn needs_restart(&self, next: &Self) -> bool {
        self.srv != next.srv || self.ttl != next.ttl || self.local_domains != next.local_domains
    }
}

/// How [`Dnsmasq::set_zone`] applied a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Only host records changed: hosts file rewritten, SIGHUP, same process.
    Reloaded,
    /// SRV records, TTL or local domains changed: new configuration, new process.
    Restarted,
}

/// A running dnsmasq; see the module docs.
pub struct Dnsmasq {
    node: Node,
    listen: SocketAddr,
    zone: DnsZone,
    conf: PathBuf,
    hosts: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
    process: Process,
    frozen: bool,
}

impl Dnsmasq {
    /// Starts dnsmasq in `node`'s namespace listening on `listen` (UDP and TCP), e.g. the
    /// node's bridge address port 53, or 127.0.0.1:5353; returns once it serves `zone`.
    pub fn start(node: &Node, listen: SocketAddr, zone: DnsZone) -> Result<Self> {
        zone.check()?;
        let conf = node.new_file("dnsmasq", "conf");
        let hosts = conf.with_extension("hosts");
        let log = conf.with_extension("log");
        let stderr = conf.with_extension("stderr");
        write_files(&conf, &hosts, &log, listen, &zone)?;
        let process = spawn(node, &conf, &stderr)?;
        let mut dns = Self {
            node: node.clone(),
            listen,
            zone,
            conf,
            hosts,
            log,
            stderr,
            process,
            frozen: false,
        };
        dns.wait_read(0)?;
        Ok(dns)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The current process (a restart changes it).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn zone(&self) -> &DnsZone {
        &self.zone
    }

    /// dnsmasq's log (every query is logged).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The configuration file dnsmasq was started with.
    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    /// Serves `zone` from now on: SIGHUP when only host records changed, else a restart
    /// (see the module docs). Returns once the new records are served.
    pub fn set_zone(&mut self, zone: DnsZone) -> Result<Applied> {
        zone.check()?;
        ensure!(
            !self.frozen,
            "dnsmasq is frozen; thaw it before changing its zone"
        );
        if self.zone.needs_restart(&zone) {
            self.stop_process()?;
            write_files(&self.conf, &self.hosts, &self.log, self.listen, &zone)?;
            self.process = spawn(&self.node, &self.conf, &self.stderr)?;
            self.zone = zone;
            self.wait_read(0)?;
            Ok(Applied::Restarted)
        } else {
            let before = self.reads();
            fs::write(&self.hosts, zone.hosts_file())
                .with_context(|| format!("write {}", self.hosts.display()))?;
            self.process
                .signal(libc::SIGHUP)
                .context("SIGHUP dnsmasq")?;
            self.zone = zone;
            self.wait_read(before)?;
            Ok(Applied::Reloaded)
        }
    }

    /// Stops the process (SIGSTOP) without closing its sockets: queries are received but
    /// never answered, as with an overloaded or cut-off resolver, so clients time out
    /// (rather than getting ICMP port unreachable, as with a stopped server).
    pub fn freeze(&mut self) -> Result<()> {
        self.process.signal(libc::SIGSTOP)?;
        self.frozen = true;
        Ok(())
    }

    /// Undoes [`Dnsmasq::freeze`]; queued queries are then answered.
    pub fn thaw(&mut self) -> Result<()> {
        self.process.signal(libc::SIGCONT)?;
        self.frozen = false;
        Ok(())
    }

    /// How many times the current process has logged reading the hosts file.
    fn reads(&self) -> usize {
        let marker = format!(
            "dnsmasq[{}]: read {} - ",
            self.process.pid(),
            self.hosts.display()
        );
        self.log().lines().filter(|l| l.contains(&marker)).count()
    }

    /// Waits until the current process has read the hosts file more than `before` times.
    /// dnsmasq binds its sockets before it logs anything and reads the hosts file just
    /// before it starts answering, so after this line every query sees the new records.
    fn wait_read(&mut self, before: usize) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.reads() > before {
                return Ok(());
            }
            if let Some(status) = self.process.try_wait()? {
                bail!(
                    "dnsmasq on {} exited ({status}) before serving; stderr: {}\nlog: {}",
                    self.listen,
                    fs::read_to_string(&self.stderr).unwrap_or_default().trim(),
                    self.log().trim()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "dnsmasq on {} did not read {} within {READY_TIMEOUT:?}; log: {}",
                    self.listen,
                    self.hosts.display(),
                    self.log().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL if it does not exit in time; the listening sockets are closed
    /// once this returns.
    fn stop_process(&mut self) -> Result<()> {
        if self.frozen {
            self.thaw()?;
        }
        if self.process.try_wait()?.is_some() {
            return Ok(());
        }
        self.process.signal(libc::SIGTERM)?;
        if self.process.wait_timeout(STOP_TIMEOUT)?.is_none() {
            let child = self.process.child_mut();
            child.kill().context("kill dnsmasq")?;
            child.wait().context("reap dnsmasq")?;
        }
        Ok(())
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        // `Process`'s own drop sends SIGKILL, which also ends a frozen process; the
        // topology's teardown would kill it anyway, with the rest of the cgroup.
        let _ = self.stop_process();
    }
}

/// dnsmasq's configuration and hosts file for `zone`. The log file is appended to across
/// restarts, so one file tells the whole story of a test.
fn write_files(
    conf: &Path,
    hosts: &Path,
    log: &Path,
    listen: SocketAddr,
    zone: &DnsZone,
) -> Result<()> {
    let mut text = String::from("# written by mesh_testbed::dns\n");
    let lines = [
        // Nothing from the host: no /etc/resolv.conf upstreams, no /etc/hosts, no polling.
        "no-resolv".to_string(),
        "no-hosts".to_string(),
        "no-poll".to_string(),
        // Bind exactly `listen`, not the wildcard address, so several can share a
        // namespace.
        "bind-interfaces".to_string(),
        format!("listen-address={}", listen.ip()),
        format!("port={}", listen.port()),
        // Root keeps reading the topology's files after a SIGHUP; no pid file in /run.
        "user=root".to_string(),
        "group=root".to_string(),
        "pid-file=".to_string(),
        format!("log-facility={}", log.display()),
        "log-queries".to_string(),
        format!("local-ttl={}", zone.ttl),
        format!("addn-hosts={}", hosts.display()),
    ];
    for line in lines {
        let _ = writeln!(text, "{line}");
    }
    for domain in &zone.local_domains {
        let _ = writeln!(text, "local=/{domain}/");
    }
    for srv in &zone.srv {
        let _ = writeln!(
            text,
            "srv-host={},{},{},{},{}",
            srv.name, srv.target, srv.port, srv.priority, srv.weight
        );
    }
    fs::write(conf, text).with_context(|| format!("write {}", conf.display()))?;
    fs::write(hosts, zone.hosts_file()).with_context(|| format!("write {}", hosts.display()))?;
    Ok(())
}

fn spawn(node: &Node, conf: &Path, stderr: &Path) -> Result<Process> {
    let mut command = node.command(dnsmasq_bin()?)?;
    command
        // Foreground, so the process we hold is dnsmasq itself; logging goes to the
        // log-facility file (--no-daemon would also log to stderr).
        .arg("--keep-in-foreground")
        .arg(format!("--conf-file={}", conf.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(stderr).with_context(|| format!("create {}", stderr.display()))?);
    Process::spawn(&mut command)
}

/// dnsmasq from PATH, or /usr/sbin (not on a non-root user's PATH on Debian).
fn dnsmasq_bin() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("dnsmasq"))
        .find(|bin| bin.is_file())
        .context("dnsmasq not found on PATH or in /usr/sbin (Debian: apt-get install dnsmasq-base)")
}
