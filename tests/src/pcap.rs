//! Packet captures on a node's interfaces with `tcpdump`, and reading them back: what
//! crossed the wire between two nodes, and whether a marker ever crossed it in clear text.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::process::Process;
use crate::topology::Node;

const START_TIMEOUT: Duration = Duration::from_secs(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running `tcpdump -i <interface> -w <file>` in a node's namespace; killed if dropped
/// without [`LinkCapture::stop`].
pub struct LinkCapture {
    process: Process,
    pcap: PathBuf,
    log: PathBuf,
}

impl LinkCapture {
    /// Starts capturing every packet (full length) on `interface` of `node`, e.g. the
    /// node's end of an inter-node link (`to-node2`, see `Topology::link_nodes`), and waits
    /// until tcpdump says it is listening.
    pub fn start(node: &Node, interface: &str) -> Result<Self> {
        let pcap = node.new_file(&format!("capture-{}-{interface}", node.name()), "pcap");
        let log = pcap.with_extension("log");
        let mut command = node.command("tcpdump")?;
        // -Z root: do not drop to the tcpdump user, which may not write the topology dir.
        // --immediate-mode: hand every packet to tcpdump at once, not in ring-buffer blocks
        // (which a stop would discard); -U: write each packet to the file as it arrives.
        command
            .args(["-i", interface, "-n", "-s", "0", "--immediate-mode", "-U"])
            .args(["-Z", "root", "-w"])
            .arg(&pcap)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let process = Process::spawn(&mut command).context("start tcpdump (is it installed?)")?;
        let mut capture = Self { process, pcap, log };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = fs::read_to_string(&capture.log).unwrap_or_default();
            if log.contains("listening on") {
                return Ok(capture);
            }
            if let Some(status) = capture.process.try_wait()? {
                bail!("tcpdump on {interface} exited ({status}): {}", log.trim());
            }
            if Instant::now() >= deadline {
                bail!("tcpdump on {interface} not listening after {START_TIMEOUT:?}: {log}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pcap_path(&self) -> &Path {
        &self.pcap
    }

    /// Stops tcpdump cleanly (SIGINT: it flushes and closes the file) and reads the capture.
    pub fn stop(mut self) -> Result<Capture> {
        // Packets sent just before the stop may still be on their way through the veth.
        thread::sleep(Duration::from_millis(200));
        self.process.signal(libc::SIGINT)?;
        match self.process.wait_timeout(STOP_TIMEOUT)? {
            Some(_) => {}
            None => bail!("tcpdump did not stop within {STOP_TIMEOUT:?} of SIGINT"),
        }
        let summary = fs::read_to_string(&self.log).unwrap_or_default();
        let capture = Capture::read(&self.pcap)?;
        println!(
            "capture {}: {} packets ({})",
            self.pcap.display(),
            capture.packets.len(),
            summary
                .lines()
                .filter(|l| l.contains("packets"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(capture)
    }
}

/// One IPv4 packet of a capture (other packets are counted but not decoded).
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol number: 6 TCP, 17 UDP.
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// The TCP or UDP payload.
    pub payload: Vec<u8>,
}

impl Packet {
    /// TCP with `port` as source or destination port.
    pub fn is_tcp_port(&self, port: u16) -> bool {
        self.protocol == 6 && (self.src_port == port || self.dst_port == port)
    }
}

/// A pcap file read back.
pub struct Capture {
    /// The whole file, to search for bytes anywhere (headers included).
    pub raw: Vec<u8>,
    /// Every frame in the file (`frames` counts also what was not IPv4).
    pub frames: usize,
    pub packets: Vec<Packet>,
}

impl Capture {
    /// Reads a classic pcap file (as tcpdump -w writes it) of Ethernet frames.
    pub fn read(path: &Path) -> Result<Self> {
        let raw = fs::read(path).with_context(|| format!("read {}", path.display()))?;
        let mut capture = Self::parse(&raw).with_context(|| format!("parse {}", path.display()))?;
        capture.raw = raw;
        Ok(capture)
    }

    fn parse(raw: &[u8]) -> Result<Self> {
        ensure!(raw.len() >= 24, "shorter than a pcap header");
        let magic = u32::from_le_bytes(raw[0..4].try_into()?);
        let le = match magic {
            0xa1b2_c3d4 | 0xa1b2_3c4d => true,
            0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
            _ => bail!("not a pcap file (magic {magic:#x})"),
        };
        let u32_at = |b: &[u8], at: usize| -> u32 {
            let bytes: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
            if le {
                u32::from_le_bytes(bytes)
            } else {
                u32::from_be_bytes(bytes)
            }
        };
        let link_type = u32_at(raw, 20);
        ensure!(
            link_type == 1,
            "link type {link_type}, expected Ethernet (1)"
        );
        let mut packets = Vec::new();
        let mut frames = 0;
        let mut at = 24;
        while at + 16 <= raw.len() {
            let caplen = u32_at(raw, at + 8) as usize;
            let start = at + 16;
            ensure!(start + caplen <= raw.len(), "truncated record at {at}");
            frames += 1;
            if let Some(packet) = decode_ethernet(&raw[start..start + caplen]) {
                packets.push(packet);
            }
            at = start + caplen;
        }
        Ok(Self {
            raw: Vec::new(),
            frames,
            packets,
        })
    }

    /// True if `needle` occurs anywhere in the file.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.raw.windows(needle.len()).any(|w| w == needle)
    }

    /// TCP packets from or to `port`, and how many of them carried payload.
    pub fn tcp_port_counts(&self, port: u16) -> (usize, usize) {
        let on_port: Vec<&Packet> = self
            .packets
            .iter()
            .filter(|p| p.is_tcp_port(port))
            .collect();
        let with_data = on_port.iter().filter(|p| !p.payload.is_empty()).count();
        (on_port.len(), with_data)
    }

    /// Distinct TCP ports (source and destination) seen, for failure messages.
    pub fn tcp_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .packets
            .iter()
            .filter(|p| p.protocol == 6)
            .flat_map(|p| [p.src_port, p.dst_port])
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }
}

fn decode_ethernet(frame: &[u8]) -> Option<Packet> {
    if frame.len() < 14 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let header = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    if header < 20 || total < header {
        return None;
    }
    let protocol = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[header..total];
    if l4.len() < 4 {
        return None;
    }
    let src_port = u16::from_be_bytes([l4[0], l4[1]]);
    let dst_port = u16::from_be_bytes([l4[2], l4[3]]);
    let payload = match protocol {
        6 if l4.len() >= 20 => {
            let offset = usize::from(l4[12] >> 4) * 4;
            l4.get(offset..)?.to_vec()
        }
        17 if l4.len() >= 8 => l4[8..].to_vec(),
        _ => Vec::new(),
    };
    Some(Packet {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_tcp_frame() {
        let mut file = Vec::new();
        file.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        file.extend_from_slice(&[2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        file.extend_from_slice(&65535u32.to_le_bytes());
        file.extend_from_slice(&1u32.to_le_bytes());
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let payload = b"hello";
        let total = (20 + 20 + payload.len()) as u16;
        frame.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, 6]);
        frame.extend_from_slice(&[0, 0, 198, 18, 1, 2, 198, 18, 2, 2]);
        frame.extend_from_slice(&[0x9c, 0x40, 0x3a, 0xa0]); // 40000 -> 15008
        frame.extend_from_slice(&[0; 8]);
        frame.extend_from_slice(&[0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        file.extend_from_slice(&[0; 8]);
        file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        file.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        file.extend_from_slice(&frame);

        let mut capture = Capture::parse(&file).unwrap();
        capture.raw = file;
        assert_eq!(capture.frames, 1);
        let p = &capture.packets[0];
        assert_eq!(
            (p.src, p.dst),
            ("198.18.1.2".parse().unwrap(), "198.18.2.2".parse().unwrap())
        );
        assert_eq!((p.src_port, p.dst_port), (40000, 15008));
        assert_eq!(p.payload, payload);
        assert_eq!(capture.tcp_port_counts(15008), (1, 1));
        assert!(capture.contains(b"hello"));
        assert!(!capture.contains(b"world"));
    }
}
