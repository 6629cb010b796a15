//! Working inside a task's network namespace.
//!
//! A socket belongs to the netns of the thread that created it, for its whole life. So each task
//! gets one dedicated OS thread that `setns`-es into the task's netns once and then creates
//! sockets on request; tokio then drives those sockets from its own threads. Tokio worker threads
//! themselves never change namespace.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use anyhow::{Context, anyhow, bail};

type Job = Box<dyn FnOnce() + Send>;

/// Called with every socket [`NetnsWorker::tcp_socket`] hands out, before it connects (the
/// capture module registers them for the loopback redirect).
pub type NewSocketHook = Arc<dyn Fn(&TcpStream) + Send + Sync>;

/// Unconnected IPv4 sockets made ahead in the netns: a connect takes one without a round trip
/// to the worker thread (two thread wake-ups, tens of microseconds on a busy VM), and the worker
/// makes more in the background when they run low.
const SPARE_SOCKETS: usize = 16;
const REFILL_BELOW: usize = SPARE_SOCKETS / 2;

/// A thread living in one task's netns.
pub struct NetnsWorker {
    jobs: mpsc::Sender<Job>,
    path: PathBuf,
    spare: Arc<Spare>,
    on_new_socket: Option<NewSocketHook>,
}

#[derive(Default)]
struct Spare {
    sockets: Mutex<Vec<TcpStream>>,
    refilling: AtomicBool,
}

impl NetnsWorker {
    /// Opens `netns_path` and starts the worker thread inside it. Fails, naming the path, if the
    /// namespace does not exist or is not a network namespace.
    pub fn spawn(
        label: &str,
        netns_path: &Path,
        on_new_socket: Option<NewSocketHook>,
    ) -> anyhow::Result<NetnsWorker> {
        let ns = File::open(netns_path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => anyhow!(
                "network namespace {} does not exist (has the task stopped?)",
                netns_path.display()
            ),
            _ => anyhow!(e).context(format!(
                "cannot open network namespace {}",
                netns_path.display()
            )),
        })?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
        std::thread::Builder::new()
            .name(format!("netns-{label}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                // SAFETY: `ns` is an open fd; setns only affects this thread.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                let entered = if rc == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                };
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                drop(ns);
                if !ok {
                    return;
                }
                // Ends when the NetnsWorker (the only sender) is dropped.
                while let Ok(job) = inbox.recv() {
                    job();
                }
            })
            .context("cannot start a netns worker thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(NetnsWorker {
                jobs,
                path: netns_path.to_owned(),
                spare: Arc::default(),
                on_new_socket,
            }),
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                bail!("{} is not a network namespace", netns_path.display())
            }
            Ok(Err(e)) => Err(anyhow!(e).context(format!(
                "cannot enter network namespace {}",
                netns_path.display()
            ))),
            Err(_) => bail!("netns worker for {} died", netns_path.display()),
        }
    }

    /// Runs `f` on the worker thread, inside the task's netns.
    pub async fn run<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| anyhow!("netns worker for {} has stopped", self.path.display()))?;
        rx.await
            .map_err(|_| anyhow!("netns worker for {} has stopped", self.path.display()))
    }

    /// Binds a non-blocking TCP listener inside the netns.
    pub async fn bind(&self, addr: SocketAddr) -> anyhow::Result<TcpListener> {
        let listener = self
            .run(move || {
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok::<_, io::Error>(l)
            })
            .await?
            .with_context(|| {
                format!(
                    "cannot listen on {addr} in network namespace {}",
                    self.path.display()
                )
            })?;
        Ok(listener)
    }

    /// A fresh, unconnected, non-blocking TCP socket that lives in the netns, ready for
    /// `tokio::net::TcpSocket::from_std_stream` and `connect`.
    pub async fn tcp_socket(&self, ipv6: bool) -> anyhow::Result<TcpStream> {
        if !ipv6 {
            let (taken, left) = {
                let mut sockets = self.spare.sockets.lock().unwrap_or_else(|p| p.into_inner());
                (sockets.pop(), sockets.len())
            };
            if left < REFILL_BELOW {
                self.refill();
            }
            if let Some(socket) = taken {
                self.announce(&socket);
                return Ok(socket);
            }
        }
        let socket = self.run(move || new_tcp_socket(ipv6)).await??;
        self.announce(&socket);
        Ok(socket)
    }

    fn announce(&self, socket: &TcpStream) {
        if let Some(hook) = &self.on_new_socket {
            hook(socket);
        }
    }

    /// Asks the worker for more spare sockets, unless it is already making them.
    fn refill(&self) {
        if self.spare.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let spare = self.spare.clone();
        let job: Job = Box::new(move || {
            let have = spare
                .sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            let made: Vec<TcpStream> = (have..SPARE_SOCKETS)
                .map_while(|_| new_tcp_socket(false).ok())
                .collect();
            spare
                .sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(made);
            spare.refilling.store(false, Ordering::Release);
        });
        if self.jobs.send(job).is_err() {
            self.spare.refilling.store(false, Ordering::Release);
        }
    }

    /// A TCP connection to `addr` made from inside the netns (so it carries the task's own
    /// address, routes and security groups), with `TCP_NODELAY`, within `timeout` (a timeout
    /// is an `io::ErrorKind::TimedOut` error).
    pub async fn connect(
        &self,
        addr: std::net::SocketAddr,
        timeout: std::time::Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = self
            .tcp_socket(addr.is_ipv6())
            .await
            .map_err(|e| io::Error::other(format!("{e:#}")))?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket);
        let _ = socket.set_nodelay(true);
        tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

fn new_tcp_socket(ipv6: bool) -> io::Result<TcpStream> {
    let domain = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket we own; a TcpStream over an unconnected socket is what
    // TcpSocket::from_std_stream expects.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(TcpStream::from(owned))
}

/// The kernel's identifier of the netns a socket lives in (`SO_NETNS_COOKIE`), the same value the
/// sock_ops program records with `bpf_get_netns_cookie`.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    socket_option_u64(socket, SO_NETNS_COOKIE)
}

/// The kernel's identifier of a socket (`SO_COOKIE`), the value `bpf_get_socket_cookie` returns.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    socket_option_u64(socket, libc::SO_COOKIE)
}

fn socket_option_u64(socket: &impl AsRawFd, name: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer is a valid u64 and `len` holds its size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}
