//! Byte copying between two sockets with half-close and backpressure, metered as it goes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-direction copy buffer. Small on purpose: an idle proxied connection costs two of these.
const BUFFER_SIZE: usize = 16 * 1024;

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
    let mut a = Metered::new(a, a_to_b, &[]);
    let mut b = Metered::new(b, b_to_a, &[]);
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUFFER_SIZE, BUFFER_SIZE).await?;
    Ok(())
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
}
