//! The DNS server of the discovery tests, without the agent: dnsmasq in a node's namespace
//! (`mesh_testbed::dns`) answers A, AAAA and SRV records the way Cloud Map and Consul DNS
//! do, with the configured TTL, and a changed record set is served once `set_zone` returns.
//! The questions are asked with hickory (the agent's DNS library) from inside the node's or
//! a task's namespace, and the raw answers are checked: codes, TTLs, sections.
//!
//! These tests need root, cgroup v2, iproute2 and dnsmasq (Debian: dnsmasq-base). Without
//! them they fail with the reason; they never skip.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hickory_resolver::config::{NameServerConfigGroup, ResolverOpts};
use hickory_resolver::name_server::{NameServerPool, TokioConnectionProvider};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, Record, RecordType};
use hickory_resolver::proto::xfer::{DnsHandle, DnsRequestOptions, FirstAnswer};
use hickory_resolver::proto::{ProtoError, ProtoErrorKind};
use mesh_testbed::dns::{Applied, DnsZone, Dnsmasq, Srv};
use mesh_testbed::{Topology, netns};

/// One question's answer as the server sent it.
#[derive(Debug)]
struct Reply {
    code: ResponseCode,
    /// (owner, TTL, data), e.g. ("orders.apps.local.", 7, "198.18.2.2").
    answers: BTreeSet<(String, u32, String)>,
    additionals: BTreeSet<(String, u32, String)>,
    /// Whether the authority section carries an SOA (a cacheable negative answer).
    soa: bool,
}

fn rows(records: &[Record]) -> BTreeSet<(String, u32, String)> {
    records
        .iter()
        .map(|r| (r.name().to_string(), r.ttl(), r.data().to_string()))
        .collect()
}

fn row(owner: &str, ttl: u32, data: &str) -> (String, u32, String) {
    (owner.to_string(), ttl, data.to_string())
}

/// Asks `server` for the `rtype` records of `name` from inside the network namespace at
/// `netns`: one try, no cache, no search list. `Err` only when no answer came at all.
fn ask(netns: &Path, server: SocketAddr, name: &str, rtype: RecordType) -> Result<Reply> {
    let name = Name::from_str_relaxed(format!("{name}."))?;
    netns::run_in(netns, move || {
        // A runtime of this thread alone, so every socket is made in the namespace.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let mut opts = ResolverOpts::default();
            opts.timeout = Duration::from_secs(1);
            let pool = NameServerPool::from_config(
                NameServerConfigGroup::from_ips_clear(&[server.ip()], server.port(), true),
                opts,
                TokioConnectionProvider::default(),
            );
            let mut options = DnsRequestOptions::default();
            options.use_edns = true;
            let result = pool
                .lookup(Query::query(name.clone(), rtype), options)
                .first_answer()
                .await;
            reply(result).with_context(|| format!("{rtype} {name} from {server}"))
        })
    })?
}

fn reply(result: Result<hickory_resolver::proto::xfer::DnsResponse, ProtoError>) -> Result<Reply> {
    match result {
        Ok(response) => Ok(Reply {
            code: response.response_code(),
            answers: rows(response.answers()),
            additionals: rows(response.additionals()),
            soa: response.soa().is_some(),
        }),
        // hickory reports answers without records, and error codes, as errors.
        Err(e) => match e.kind() {
            ProtoErrorKind::NoRecordsFound {
                response_code, soa, ..
            } => Ok(Reply {
                code: *response_code,
                answers: BTreeSet::new(),
                additionals: BTreeSet::new(),
                soa: soa.is_some(),
            }),
            _ => Err(e.into()),
        },
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A Cloud Map namespace `apps.local` with service `orders` (A records for awsvpc, SRV
/// with per-instance targets), and the same service as Consul publishes it in RFC 2782
/// form.
fn orders_zone() -> DnsZone {
    DnsZone::new()
        .ttl(7)
        .local_domain("apps.local")
        .host("orders.apps.local", ip("198.18.2.2"))
        .host("orders.apps.local", ip("198.18.2.3"))
        .host("i-1.orders.apps.local", ip("198.18.2.2"))
        .host("i-2.orders.apps.local", ip("198.18.2.3"))
        .host("i-2.orders.apps.local", ip("2001:db8::3"))
        .srv(Srv::new("orders.apps.local", "i-1.orders.apps.local", 8080))
        .srv(Srv::new("orders.apps.local", "i-2.orders.apps.local", 9090))
        .srv(Srv {
            name: "_orders._tcp.service.consul".into(),
            target: "i-1.orders.apps.local".into(),
            port: 21000,
            priority: 0,
            weight: 0,
        })
}

#[test]
fn dnsmasq_serves_a_and_srv_records_with_the_configured_ttl() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let task = node.add_task("client")?;
    // On the node's bridge address, port 53: where a VPC resolver would be for the agent.
    let server = SocketAddr::new(node.ip().into(), 53);
    let dns = Dnsmasq::start(&node, server, orders_zone())?;
    let here = node.netns_path();

    let a = ask(&here, server, "orders.apps.local", RecordType::A)?;
    assert_eq!(a.code, ResponseCode::NoError);
    assert_eq!(
        a.answers,
        BTreeSet::from([
            row("orders.apps.local.", 7, "198.18.2.2"),
            row("orders.apps.local.", 7, "198.18.2.3"),
        ])
    );

    // Cloud Map form: every target's addresses come along in the additional section.
    let srv = ask(&here, server, "orders.apps.local", RecordType::SRV)?;
    assert_eq!(
        srv.answers,
        BTreeSet::from([
            row("orders.apps.local.", 7, "1 1 8080 i-1.orders.apps.local."),
            row("orders.apps.local.", 7, "1 1 9090 i-2.orders.apps.local."),
        ])
    );
    assert_eq!(
        srv.additionals,
        BTreeSet::from([
            row("i-1.orders.apps.local.", 7, "198.18.2.2"),
            row("i-2.orders.apps.local.", 7, "198.18.2.3"),
            row("i-2.orders.apps.local.", 7, "2001:db8::3"),
        ])
    );

    // Consul's RFC 2782 form: underscores and priority/weight 0.
    let consul = ask(
        &here,
        server,
        "_orders._tcp.service.consul",
        RecordType::SRV,
    )?;
    assert_eq!(
        consul.answers,
        BTreeSet::from([row(
            "_orders._tcp.service.consul.",
            7,
            "0 0 21000 i-1.orders.apps.local."
        )])
    );

    // Positive "no records" answers, both without an SOA (so not cacheable).
    let nodata = ask(&here, server, "orders.apps.local", RecordType::AAAA)?;
    assert_eq!(
        (nodata.code, nodata.answers.len(), nodata.soa),
        (ResponseCode::NoError, 0, false)
    );
    let nx = ask(&here, server, "payments.apps.local", RecordType::A)?;
    assert_eq!((nx.code, nx.soa), (ResponseCode::NXDomain, false));
    // Outside the local domains there is no upstream: REFUSED, an error, not an answer.
    let refused = ask(&here, server, "example.com", RecordType::A)?;
    assert_eq!(refused.code, ResponseCode::Refused);

    // Reachable from a task too, as the node's resolver is.
    let from_task = ask(
        &task.netns_path(),
        server,
        "i-1.orders.apps.local",
        RecordType::A,
    )?;
    assert_eq!(
        from_task.answers,
        BTreeSet::from([row("i-1.orders.apps.local.", 7, "198.18.2.2")])
    );

    // Every question is in dnsmasq's log, for debugging a failed test.
    ensure!(
        dns.log().contains("query[SRV] _orders._tcp.service.consul"),
        "query log missing:\n{}",
        dns.log()
    );
    Ok(())
}

#[test]
fn host_changes_are_applied_by_sighup_and_srv_changes_by_a_restart() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let here = node.netns_path();
    let server: SocketAddr = "127.0.0.1:5353".parse()?;
    let zone = orders_zone();
    let mut dns = Dnsmasq::start(&node, server, zone.clone())?;
    let first_pid = dns.pid();

    // An instance replaced: only host records change, so a SIGHUP does.
    let replaced = zone
        .without_host("orders.apps.local")
        .host("orders.apps.local", ip("198.18.2.4"));
    assert_eq!(dns.set_zone(replaced.clone())?, Applied::Reloaded);
    assert_eq!(dns.pid(), first_pid);
    let a = ask(&here, server, "orders.apps.local", RecordType::A)?;
    assert_eq!(
        a.answers,
        BTreeSet::from([row("orders.apps.local.", 7, "198.18.2.4")])
    );

    // Why SRV changes need more: dnsmasq re-reads hosts files on SIGHUP, not srv-host.
    let conf = std::fs::read_to_string(dns.conf_path())?;
    std::fs::write(dns.conf_path(), conf.replace(",8080,", ",8181,"))?;
    let log_lines = dns.log().lines().count();
    // SAFETY: kill(2) on the dnsmasq child this test owns and has not reaped.
    ensure!(unsafe { libc::kill(dns.pid() as i32, libc::SIGHUP) } == 0);
    wait_until("dnsmasq re-reads its hosts file", || {
        dns.log()
            .lines()
            .skip(log_lines)
            .any(|l| l.contains(" read "))
    })?;
    let srv = ask(&here, server, "orders.apps.local", RecordType::SRV)?;
    ensure!(
        srv.answers.contains(&row(
            "orders.apps.local.",
            7,
            "1 1 8080 i-1.orders.apps.local."
        )),
        "a SIGHUP applied an srv-host change after all: {srv:?}"
    );

    // An SRV change through the helper restarts dnsmasq and is served at once.
    let moved = replaced.without_srv("orders.apps.local").srv(Srv::new(
        "orders.apps.local",
        "i-2.orders.apps.local",
        9191,
    ));
    assert_eq!(dns.set_zone(moved)?, Applied::Restarted);
    assert_ne!(dns.pid(), first_pid);
    let srv = ask(&here, server, "orders.apps.local", RecordType::SRV)?;
    assert_eq!(
        srv.answers,
        BTreeSet::from([row(
            "orders.apps.local.",
            7,
            "1 1 9191 i-2.orders.apps.local."
        )])
    );
    // The host records survived the restart.
    let a = ask(&here, server, "orders.apps.local", RecordType::A)?;
    assert_eq!(
        a.answers,
        BTreeSet::from([row("orders.apps.local.", 7, "198.18.2.4")])
    );
    // The A records going away: a SIGHUP again.
    let pid = dns.pid();
    let gone = dns.zone().clone().without_host("orders.apps.local");
    assert_eq!(dns.set_zone(gone)?, Applied::Reloaded);
    assert_eq!(dns.pid(), pid);
    let nx = ask(&here, server, "orders.apps.local", RecordType::A)?;
    // The name still owns an SRV record, so it exists: NODATA rather than NXDOMAIN.
    assert_eq!((nx.code, nx.answers.len()), (ResponseCode::NoError, 0));
    Ok(())
}

#[test]
fn a_ttl_change_restarts_and_ttl_zero_is_served_as_consul_does() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let here = node.netns_path();
    let server = SocketAddr::new(node.ip().into(), 53);
    let mut dns = Dnsmasq::start(&node, server, orders_zone())?;
    assert_eq!(dns.set_zone(orders_zone().ttl(0))?, Applied::Restarted);
    let a = ask(&here, server, "i-1.orders.apps.local", RecordType::A)?;
    assert_eq!(
        a.answers,
        BTreeSet::from([row("i-1.orders.apps.local.", 0, "198.18.2.2")])
    );
    let srv = ask(
        &here,
        server,
        "_orders._tcp.service.consul",
        RecordType::SRV,
    )?;
    assert!(srv.answers.iter().all(|(_, ttl, _)| *ttl == 0), "{srv:?}");
    assert!(
        srv.additionals.iter().all(|(_, ttl, _)| *ttl == 0),
        "{srv:?}"
    );
    Ok(())
}

#[test]
fn a_frozen_dnsmasq_times_out_and_answers_again_when_thawed() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let here = node.netns_path();
    let server = SocketAddr::new(node.ip().into(), 53);
    let mut dns = Dnsmasq::start(&node, server, orders_zone())?;
    dns.freeze()?;
    let started = Instant::now();
    let frozen = ask(&here, server, "orders.apps.local", RecordType::A);
    let error = format!("{:#}", frozen.expect_err("a frozen dnsmasq answered"));
    ensure!(error.contains("timed out"), "not a timeout: {error}");
    ensure!(
        started.elapsed() >= Duration::from_millis(900),
        "failed too fast: {error}"
    );
    ensure!(
        dns.set_zone(orders_zone().ttl(1)).is_err(),
        "a frozen dnsmasq cannot apply changes"
    );
    dns.thaw()?;
    let a = ask(&here, server, "orders.apps.local", RecordType::A)?;
    assert_eq!(a.answers.len(), 2);
    Ok(())
}

#[test]
fn dropping_dnsmasq_stops_it_and_frees_its_address() -> Result<()> {
    let topology = Topology::new()?;
    let node = topology.add_node()?;
    let server = SocketAddr::new(node.ip().into(), 53);
    let dns = Dnsmasq::start(&node, server, orders_zone())?;
    let pid = dns.pid();

    // A second server on the same address fails, and says why.
    let Err(taken) = Dnsmasq::start(&node, server, orders_zone()) else {
        bail!("two dnsmasq bound {server}");
    };
    let taken = format!("{taken:#}");
    ensure!(
        taken.contains("exited") && taken.contains("in use"),
        "{taken}"
    );

    drop(dns);
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dnsmasq {pid} survived its drop"
    );
    let again = Dnsmasq::start(&node, server, orders_zone())?;
    let a = ask(
        &node.netns_path(),
        server,
        "orders.apps.local",
        RecordType::A,
    )?;
    assert_eq!(a.answers.len(), 2);
    drop(again);
    Ok(())
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() >= deadline {
            bail!("{what}: not within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
