//! Byte copying between two sockets with half-close and backpressure, metered as it goes.
//!
//! Copy buffers are borrowed from a per-thread pool only while bytes are in flight: a read is
//! attempted with a pooled buffer, and if nothing is there the buffer goes straight back. So an
//! idle proxied connection holds no buffer at all (10,000 idle connections cost their sockets,
//! not 10,000 × 2 buffers), and a busy one reuses the same few buffers instead of allocating.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of a copy buffer (one read). Larger than a socket's typical burst so that bulk
/// transfers take few syscalls; costless for idle connections, which hold none.
const BUFFER_SIZE: usize = 32 * 1024;
/// Buffers kept per thread for reuse; more in flight at once are allocated and freed.
const POOLED_PER_THREAD: usize = 64;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Buffers lent out on this thread and not yet given back (tests check that idle splices
    /// hold none; a `#[tokio::test]` runs all its tasks on its own thread).
    static LENT: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

fn take_buffer() -> Box<[u8]> {
    #[cfg(test)]
    LENT.set(LENT.get() + 1);
    BUFFERS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice())
}

fn give_back(buffer: Box<[u8]>) {
    #[cfg(test)]
    LENT.set(LENT.get() - 1);
    BUFFERS.with(|b| {
        let mut pool = b.borrow_mut();
        if pool.len() < POOLED_PER_THREAD {
            pool.push(buffer);
        }
    });
}

/// Copies `a -> b` and `b -> a` until both directions have finished. When one side stops
/// sending (EOF), the other side's write half is shut down and the opposite direction keeps
/// flowing, so a client that half-closes still gets the whole response. A side that stops
/// reading stalls the copy towards it (backpressure) instead of buffering without bound.
/// Bytes read from `a` are added to every counter of `a_to_b` as they flow, likewise `b_to_a`
/// (a connection may be reported under several label sets).
pub async fn splice<A, B>(a: A, b: B, a_to_b: &[&Counter], b_to_a: &[&Counter]) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a, mut b) = (a, b);
    let mut forward = Pump::new(a_to_b);
    let mut backward = Pump::new(b_to_a);
    poll_fn(|cx| {
        let f = forward.poll(cx, &mut a, &mut b)?;
        let r = backward.poll(cx, &mut b, &mut a)?;
        if f.is_ready() && r.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One direction of a splice.
struct Pump<'c> {
    /// Bytes read but not yet written, in `buffer[start..end]`; no buffer when nothing is.
    buffer: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// Written since the last flush.
    unflushed: bool,
    done: bool,
    counters: &'c [&'c Counter],
}

impl<'c> Pump<'c> {
    fn new(counters: &'c [&'c Counter]) -> Self {
        Pump {
            buffer: None,
            start: 0,
            end: 0,
            unflushed: false,
            done: false,
            counters,
        }
    }

    fn poll<R, W>(&mut self, cx: &mut Context<'_>, from: &mut R, to: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.buffer.is_none() {
                let mut buffer = take_buffer();
                let mut read = ReadBuf::new(&mut buffer);
                match Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Pending => {
                        // Nothing to copy: no buffer held while waiting.
                        give_back(buffer);
                        if self.unflushed {
                            ready!(Pin::new(&mut *to).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => {
                        give_back(buffer);
                        return Poll::Ready(Err(e));
                    }
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        if n == 0 {
                            give_back(buffer);
                            // EOF: pass the half-close on.
                            ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                            self.done = true;
                            return Poll::Ready(Ok(()));
                        }
                        for c in self.counters {
                            c.inc_by(n as u64);
                        }
                        self.buffer = Some(buffer);
                        (self.start, self.end) = (0, n);
                    }
                }
            }
            let Some(buffer) = &self.buffer else {
                continue;
            };
            while self.start < self.end {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &buffer[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.unflushed = true;
            }
            if let Some(buffer) = self.buffer.take() {
                give_back(buffer);
            }
        }
    }
}

impl Drop for Pump<'_> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            give_back(buffer);
        }
    }
}

/// Counts the bytes read from and written to a stream as they flow, into every counter of
/// `read` and `written` (a connection may be reported under several label sets).
pub struct Metered<S> {
    inner: S,
    read: Vec<Counter>,
    written: Vec<Counter>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, read: &[&Counter], written: &[&Counter]) -> Metered<S> {
        Metered {
            inner,
            read: read.iter().map(|c| (*c).clone()).collect(),
            written: written.iter().map(|c| (*c).clone()).collect(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            for c in &self.read {
                c.inc_by(n);
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            for c in &self.written {
                c.inc_by(*n as u64);
            }
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client that half-closes still receives everything the server sends afterwards, and
    /// both directions are counted.
    #[tokio::test]
    async fn half_close_is_propagated_and_counted() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let (up, down) = (Counter::default(), Counter::default());
        let (u, d) = (up.clone(), down.clone());
        let proxy = tokio::spawn(async move { splice(proxy_a, proxy_b, &[&u], &[&d]).await });

        let server = tokio::spawn(async move {
            let mut server = server;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap(); // ends only if the FIN was forwarded
            server.write_all(&vec![7u8; 100_000]).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        let mut client = client;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();

        assert_eq!(server.await.unwrap(), b"request");
        assert_eq!(reply.len(), 100_000);
        proxy.await.unwrap().unwrap();
        assert_eq!(up.get(), 7);
        assert_eq!(down.get(), 100_000);
    }

    /// Idle splices hold no copy buffer; bytes still flow through all of them afterwards.
    #[tokio::test]
    async fn idle_splices_hold_no_buffer() {
        let lent_before = LENT.get();
        let mut ends = Vec::new();
        for _ in 0..200 {
            let (client, proxy_a) = tokio::io::duplex(64 * 1024);
            let (proxy_b, server) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move { splice(proxy_a, proxy_b, &[], &[]).await });
            ends.push((client, server));
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(LENT.get(), lent_before);
        for (client, server) in &mut ends {
            client.write_all(&[1u8; 40_000]).await.unwrap();
            let mut got = vec![0u8; 40_000];
            server.read_exact(&mut got).await.unwrap();
            assert!(got.iter().all(|b| *b == 1));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(LENT.get(), lent_before);
    }
}
