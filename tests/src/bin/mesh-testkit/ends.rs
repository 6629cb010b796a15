//! How a connection ends: the `abort` and `watch`/`until-end` modes, which check that a TCP
//! reset on one side of a proxied connection reaches the other side as a reset, not a FIN.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use anyhow::{Context, Result, bail};

use crate::pattern::Pattern;

/// Closes `stream` with a TCP reset (`SO_LINGER` 0) instead of a FIN.
pub fn reset(stream: TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt(SO_LINGER, 0)");
    }
    drop(stream);
    Ok(())
}

/// How the peer's bytes ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// A FIN: the peer finished.
    Eof,
    /// A TCP reset: the peer (or something between) failed.
    Reset,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            End::Eof => "eof",
            End::Reset => "reset",
        }
    }
}

/// Reads until the peer's bytes end, checking them against `pattern`: how many arrived, and
/// how they ended. Any other failure (a timeout, a wrong byte) is an error.
pub fn read_until_end(stream: &mut TcpStream, mut pattern: Pattern) -> Result<(u64, End)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut scratch = Vec::new();
    let mut got = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok((got, End::Eof)),
            Ok(n) => {
                if let Err(i) = pattern.verify(&buf[..n], &mut scratch) {
                    bail!("byte {} differs from what was sent", got + i as u64);
                }
                got += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok((got, End::Reset)),
            Err(e) => return Err(e).with_context(|| format!("read after {got} bytes")),
        }
    }
}
