//! A tunnel connection's socket, counted in `mesh_tunnel_connections_active` for exactly as
//! long as it exists.
//!
//! A connection ends in many ways (closed by either side, failed, timed out in its handshake,
//! dropped at the drain deadline, its task aborted); whichever it is, the socket is dropped
//! exactly then, so the gauge follows the socket instead of each of those paths.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Tracked<T> {
    inner: T,
    /// Already incremented for this connection; decremented on drop.
    active: Gauge,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, active: Gauge) -> Self {
        Tracked { inner, active }
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        self.active.dec();
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

// Every method is passed through, the vectored ones included: the TLS stream writes a whole
// record batch with one writev, and the default methods would split it into single writes.
impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn counts_the_socket_until_it_is_dropped_and_passes_bytes_through() {
        let active = Gauge::default();
        active.inc();
        let (near, mut far) = tokio::io::duplex(64);
        let mut tracked = Tracked::new(near, active.clone());
        tracked.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        far.write_all(b"pong").await.unwrap();
        tracked.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
        assert_eq!(active.get(), 1);
        drop(tracked);
        assert_eq!(active.get(), 0);
    }
}
