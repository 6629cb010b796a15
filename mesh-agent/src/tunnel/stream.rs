//! One tunnel stream as a byte stream: the two halves of an HTTP/2 CONNECT stream, driven
//! directly on h2.
//!
//! hyper's upgraded CONNECT stream, which this replaces, copied every write into a fresh
//! allocation and handed it through a channel to a task of its own per stream, which then
//! gave it to h2: per write one allocation, one copy and one task hand-off, per stream one
//! more task and two channels. Here a write goes to h2 from the caller's task, and the
//! stream's [`SpliceEnd`] methods let the splice pass its buffers to h2, and h2's frames to
//! the socket, without copying them at all.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::SpliceEnd;

/// The most capacity one write asks h2 for. A write hands h2 only what the peer's windows
/// allow now, so h2 never queues more than that for a stream.
const MAX_WRITE: usize = 64 * 1024;

/// An open CONNECT stream, dialled or accepted; both directions until each is ended.
pub struct TunnelIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read (what a read did not take of the last DATA frame).
    unread: Bytes,
    /// End of stream sent: writes fail from then on, shutting down again succeeds.
    write_closed: bool,
}

impl TunnelIo {
    pub(super) fn new(send: SendStream<Bytes>, recv: RecvStream) -> TunnelIo {
        TunnelIo {
            send,
            recv,
            unread: Bytes::new(),
            write_closed: false,
        }
    }

    /// Waits until the stream may take more data, and says how much of `wanted` bytes it
    /// takes now. Capacity is asked for only once there is something to send: a reservation
    /// held while idle would pin part of the connection's window for nothing.
    fn poll_sendable(&mut self, cx: &mut Context<'_>, wanted: usize) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.send.reserve_capacity(wanted.min(MAX_WRITE));
        while self.send.capacity() == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io_error(e))),
                // The stream can no longer send: the peer reset it, or it was ended.
                None => {
                    return Poll::Ready(Err(match self.send.poll_reset(cx) {
                        Poll::Ready(Ok(reason)) => reset_error(reason),
                        _ => io::ErrorKind::BrokenPipe.into(),
                    }));
                }
            }
        }
        Poll::Ready(Ok(self.send.capacity().min(MAX_WRITE).min(wanted)))
    }
}

/// The splice's way in: chunks are handed to h2 and taken from it as they are.
impl SpliceEnd for TunnelIo {
    /// The next piece of received data, without copying it; `None` at the end of the stream.
    /// Its flow-control window is given back to the peer at once: the caller holds at most
    /// this one piece.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.unread.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.unread))));
        }
        loop {
            return match ready!(self.recv.poll_data(cx)) {
                None => Poll::Ready(Ok(None)),
                Some(Ok(data)) => {
                    // Release errors only mean the stream is gone; the next poll says so.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if data.is_empty() {
                        continue;
                    }
                    Poll::Ready(Ok(Some(data)))
                }
                // A stream the peer cancelled ends like one it finished (as hyper's upgraded
                // streams did): the application sees the end of the bytes, not an error.
                Some(Err(e)) => match e.reason() {
                    Some(Reason::NO_ERROR | Reason::CANCEL) => Poll::Ready(Ok(None)),
                    _ => Poll::Ready(Err(to_io_error(e))),
                },
            };
        }
    }

    /// Sends as much of `chunk` as the stream may take now, without copying it; what was sent
    /// is advanced past. Ready once something was sent.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_sendable(cx, chunk.len()))?;
        let part = chunk.split_to(n);
        self.send.send_data(part, false).map_err(to_io_error)?;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.unread.is_empty() {
            match ready!(this.poll_read_chunk(cx))? {
                Some(data) => this.unread = data,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.unread.len());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_sendable(cx, buf.len()))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io_error)?;
        Poll::Ready(Ok(n))
    }

    /// h2 writes queued frames from its connection task; nothing waits in the stream.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Ends the stream in this direction (an empty DATA frame with END_STREAM after what is
    /// queued); the other direction stays open.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.send
                .send_data(Bytes::new(), true)
                .map_err(to_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// The peer reset the stream: its application's connection ended abnormally.
fn reset_error(reason: Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("the peer reset the tunnel stream ({reason})"),
    )
}

fn to_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into());
    }
    match e.reason() {
        Some(reason) if e.is_reset() => reset_error(reason),
        _ => io::Error::other(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A CONNECT stream over an in-memory HTTP/2 connection with `window`-byte windows: the
    /// dialling end and the answering end, each as a [`TunnelIo`].
    async fn stream_pair(window: u32) -> (TunnelIo, TunnelIo) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::Builder::new()
                .initial_window_size(window)
                .initial_connection_window_size(window)
                .handshake::<DuplexStream, Bytes>(b)
                .await
                .unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            assert_eq!(request.method(), http::Method::CONNECT);
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            let io = TunnelIo::new(send, request.into_body());
            // The connection's frames move only while it is polled.
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            io
        });
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(window)
            .initial_connection_window_size(window)
            .handshake::<DuplexStream, Bytes>(a)
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("198.18.0.2:80")
            .body(())
            .unwrap();
        let (response, send) = sender
            .ready()
            .await
            .unwrap()
            .send_request(request, false)
            .unwrap();
        let response = response.await.unwrap();
        let client = TunnelIo::new(send, response.into_body());
        (client, server.await.unwrap())
    }

    /// Bytes flow both ways; a shutdown ends one direction only, and the other then still
    /// carries the reply.
    #[tokio::test]
    async fn half_close_ends_one_direction() {
        let (mut client, mut server) = stream_pair(65_535).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        assert!(
            client.write_all(b"more").await.is_err(),
            "written after shutdown"
        );
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
    }

    /// More than the windows allow many times over, in chunks handed over without copying:
    /// everything arrives in order, because writes wait for the window instead of queueing.
    #[tokio::test]
    async fn chunks_wait_for_the_window() {
        let (mut client, mut server) = stream_pair(16_384).await;
        let data: Bytes = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            let mut rest = data;
            while !rest.is_empty() {
                poll_fn(|cx| client.poll_write_chunk(cx, &mut rest))
                    .await
                    .unwrap();
                // A write never takes more than the stream may send.
                assert!(client.send.capacity() <= 16_384);
            }
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        while let Some(chunk) = poll_fn(|cx| server.poll_read_chunk(cx)).await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived out of order or changed");
        writer.await.unwrap();
    }

    /// A peer that drops its end mid-stream (its application's connection failed): reads here
    /// end, and writes fail instead of queueing for nobody.
    #[tokio::test]
    async fn a_dropped_peer_ends_reads_and_fails_writes() {
        let (mut client, server) = stream_pair(65_535).await;
        drop(server);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
        let mut failed = false;
        for _ in 0..10 {
            if client.write_all(&[0u8; 1024]).await.is_err() {
                failed = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(failed, "writes to a reset stream kept succeeding");
    }
}
