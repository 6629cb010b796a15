//! Translates `[capture]` settings into the contents of the kernel's rule maps.

use std::collections::HashSet;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, anyhow};
use aya::Ebpf;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData};
use mesh_common::{DestV4, DestV6};

use crate::config::{CaptureSettings, Cidr, Destination};

/// What the rule maps should hold, computed from the settings alone (pure, so it is unit-tested).
#[derive(Debug, Default, PartialEq)]
pub(super) struct RuleSet {
    pub dest_v4: HashSet<DestV4>,
    pub dest_v6: HashSet<DestV6>,
    pub capture_net_v4: HashSet<(u32, [u8; 4])>,
    pub capture_net_v6: HashSet<(u32, [u8; 16])>,
    pub exclude_net_v4: HashSet<(u32, [u8; 4])>,
    pub exclude_net_v6: HashSet<(u32, [u8; 16])>,
    pub exclude_ports: HashSet<u16>,
}

impl RuleSet {
    pub(super) fn from_settings(settings: &CaptureSettings) -> RuleSet {
        let mut rules = RuleSet::default();
        for dest in &settings.destinations {
            match *dest {
                Destination::Exact(SocketAddr::V4(sa)) => {
                    rules.dest_v4.insert(DestV4 {
                        addr: sa.ip().octets(),
                        port: sa.port(),
                        _pad: 0,
                    });
                }
                Destination::Exact(SocketAddr::V6(sa)) => {
                    rules.dest_v6.insert(DestV6 {
                        addr: sa.ip().octets(),
                        port: sa.port(),
                        _pad: [0; 6],
                    });
                }
                Destination::Network(cidr) => {
                    insert_cidr(&mut rules.capture_net_v4, &mut rules.capture_net_v6, cidr)
                }
            }
        }
        for cidr in &settings.exclude_cidrs {
            insert_cidr(&mut rules.exclude_net_v4, &mut rules.exclude_net_v6, *cidr);
        }
        rules.exclude_ports = settings.exclude_ports.iter().copied().collect();
        rules
    }
}

fn insert_cidr(v4: &mut HashSet<(u32, [u8; 4])>, v6: &mut HashSet<(u32, [u8; 16])>, c: Cidr) {
    match c.addr {
        IpAddr::V4(a) => v4.insert((u32::from(c.prefix_len), a.octets())),
        IpAddr::V6(a) => v6.insert((u32::from(c.prefix_len), a.octets())),
    };
}

pub(super) fn apply(ebpf: &mut Ebpf, settings: &CaptureSettings) -> anyhow::Result<()> {
    let r = RuleSet::from_settings(settings);
    sync_hash(ebpf, "CAPTURE_DEST_V4", &r.dest_v4)?;
    sync_hash(ebpf, "CAPTURE_DEST_V6", &r.dest_v6)?;
    sync_trie(ebpf, "CAPTURE_NET_V4", &r.capture_net_v4)?;
    sync_trie(ebpf, "CAPTURE_NET_V6", &r.capture_net_v6)?;
    sync_trie(ebpf, "EXCLUDE_NET_V4", &r.exclude_net_v4)?;
    sync_trie(ebpf, "EXCLUDE_NET_V6", &r.exclude_net_v6)?;
    sync_hash(ebpf, "EXCLUDE_PORTS", &r.exclude_ports)?;
    Ok(())
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("eBPF object has no map {name}"))
}

fn sync_hash<K>(ebpf: &mut Ebpf, name: &str, want: &HashSet<K>) -> anyhow::Result<()>
where
    K: aya::Pod + Eq + Hash,
{
    let mut map: HashMap<&mut MapData, K, u8> = HashMap::try_from(map_mut(ebpf, name)?)?;
    for key in want {
        map.insert(key, 1, 0).with_context(|| {
            format!(
                "cannot add a rule to {name} ({} rules wanted; is the map full?)",
                want.len()
            )
        })?;
    }
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains(k))
        .collect();
    for key in stale {
        map.remove(&key)
            .with_context(|| format!("cannot remove a stale rule from {name}"))?;
    }
    Ok(())
}

fn sync_trie<const N: usize>(
    ebpf: &mut Ebpf,
    name: &str,
    want: &HashSet<(u32, [u8; N])>,
) -> anyhow::Result<()> {
    let mut trie: LpmTrie<&mut MapData, [u8; N], u8> = LpmTrie::try_from(map_mut(ebpf, name)?)?;
    for (prefix_len, data) in want {
        trie.insert(&Key::new(*prefix_len, *data), 1, 0)
            .with_context(|| {
                format!(
                    "cannot add a network to {name} ({} wanted; is the map full?)",
                    want.len()
                )
            })?;
    }
    let stale: Vec<(u32, [u8; N])> = trie
        .keys()
        .filter_map(Result::ok)
        .map(|k| (k.prefix_len(), k.data()))
        .filter(|k| !want.contains(k))
        .collect();
    for (prefix_len, data) in stale {
        trie.remove(&Key::new(prefix_len, data))
            .with_context(|| format!("cannot remove a stale network from {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn settings_become_map_entries() {
        let cfg = Config::parse(
            r#"
            [capture]
            destinations = ["198.18.0.3:8080", "198.18.1.9/24", "[2001:db8::1]:443", "2001:db8:1::/48"]
            exclude_ports = [22, 22]
            exclude_cidrs = ["198.18.1.200/32"]
            "#,
        )
        .unwrap();
        let r = RuleSet::from_settings(&cfg.capture);
        assert!(r.dest_v4.contains(&DestV4 {
            addr: [198, 18, 0, 3],
            port: 8080,
            _pad: 0
        }));
        assert!(r.capture_net_v4.contains(&(24, [198, 18, 1, 0])));
        assert_eq!(r.dest_v6.len(), 1);
        assert_eq!(r.capture_net_v6.len(), 1);
        assert!(r.exclude_net_v4.contains(&(32, [198, 18, 1, 200])));
        assert_eq!(r.exclude_ports, HashSet::from([22]));
    }
}
