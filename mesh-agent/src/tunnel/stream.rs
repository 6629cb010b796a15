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
                // A reset before the peer's END_STREAM (CONNECT_ERROR, CANCEL, even NO_ERROR,
                // or a lost connection) means the far connection failed, and must reach the
                // application as a failure (RFC 9113 section 8.5), never as a clean end of
                // the bytes. h2 reads a reset that follows END_STREAM (a server's NO_ERROR
                // "stop sending, I am done") as the end it is, and hands out the frames that
                // arrived before a reset first.
                Some(Err(e)) => Poll::Ready(Err(to_io_error(e))),
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

    /// Resets the stream with `CONNECT_ERROR`, RFC 9113's signal of a failed TCP connection
    /// behind a CONNECT stream: the peer agent resets its own side's connection. Data still
    /// queued in h2 for this stream is discarded, like a socket's unsent bytes on a reset.
    fn abort(&mut self) {
        self.send.send_reset(Reason::CONNECT_ERROR);
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
        // The reason's code name (CONNECT_ERROR, CANCEL), which the runbook's log lines show.
        format!("the peer reset the tunnel stream ({reason:?}: {reason})"),
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

    /// A peer that drops its end mid-stream (its task ended without finishing the stream):
    /// reads here fail as a reset, not as an end, and writes fail instead of queueing for
    /// nobody.
    #[tokio::test]
    async fn a_dropped_peer_fails_reads_and_writes() {
        let (mut client, server) = stream_pair(65_535).await;
        drop(server);
        let mut got = Vec::new();
        let read = client.read_to_end(&mut got).await;
        assert_eq!(
            read.map_err(|e| e.kind()).unwrap_err(),
            io::ErrorKind::ConnectionReset
        );
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

    /// An aborted end (its application's connection was reset) reaches the peer as a reset
    /// with CONNECT_ERROR, after the bytes sent before it.
    #[tokio::test]
    async fn abort_reaches_the_peer_as_a_reset_after_the_data() {
        let (mut client, mut server) = stream_pair(65_535).await;
        client.write_all(b"partial").await.unwrap();
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"partial");
        client.abort();
        let error = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        assert!(
            error.to_string().contains("CONNECT_ERROR"),
            "unexpected error: {error}"
        );
    }

    /// A peer that resets with NO_ERROR before its END_STREAM gave up mid-stream (and h2
    /// dropped what it still had queued): a failure, not an end.
    #[tokio::test]
    async fn no_error_reset_before_the_end_is_a_failure() {
        let (mut client, mut server) = stream_pair(65_535).await;
        server.write_all(b"partial").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        server.send.send_reset(Reason::NO_ERROR);
        let mut got = Vec::new();
        let error = client.read_to_end(&mut got).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(got, b"partial");
    }

    /// A peer that has sent its whole reply and then resets with NO_ERROR ("stop sending", as
    /// an HTTP/2 server does with a request body it no longer needs) has finished, not
    /// failed: the reply is read to a clean end.
    #[tokio::test]
    async fn no_error_reset_after_the_reply_is_an_end() {
        let (mut client, mut server) = stream_pair(65_535).await;
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        // Once the reply and its END_STREAM are out (h2 drops what is still queued when a
        // stream is reset), and the reset has reached the client before it reads.
        let settle = std::time::Duration::from_millis(50);
        tokio::time::sleep(settle).await;
        server.send.send_reset(Reason::NO_ERROR);
        tokio::time::sleep(settle).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
    }
}
