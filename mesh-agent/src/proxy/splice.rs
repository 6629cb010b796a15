//! Byte copying between two sockets with half-close and backpressure, metered as it goes.
//!
//! A splice moves owned buffers ([`Bytes`]) from one end to the other. A socket end reads into
//! a buffer borrowed from a per-thread pool and writes from whatever buffer it is given; a
//! tunnel stream end hands out the HTTP/2 frames' own buffers and sends the buffers it is
//! given as they are ([`SpliceEnd`]). So between a socket and a tunnel stream no byte is copied
//! in user space: only the kernel's copies and TLS remain.
//!
//! A connection that ends abnormally on one side ends abnormally on the other: when either
//! side fails (a TCP reset, a reset tunnel stream, a lost tunnel connection) or the splice is
//! dropped before both directions finished, both ends are aborted ([`SpliceEnd::abort`]): a
//! socket is closed with a TCP reset, a tunnel stream is reset with `CONNECT_ERROR`, as RFC
//! 9113 section 8.5 asks of a CONNECT proxy. So an application can tell a connection its peer
//! reset, or the mesh lost, from one its peer finished; a clean FIN is passed on as a FIN.
//! Bytes a side sent before it failed are passed on ahead of the failure, as far as the
//! agent still holds them or can read them ([`wind_down`]).
//!
//! Buffers are held only while bytes are in flight: a read is attempted with a pooled buffer,
//! and if nothing is there the buffer goes straight back. So an idle proxied connection holds
//! no buffer at all (10,000 idle connections cost their sockets, not 10,000 × 2 buffers), and
//! a busy one reuses the same few allocations instead of allocating per read.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Size of a read buffer. Larger than a socket's typical burst so that bulk transfers take few
/// syscalls; costless for idle connections, which hold none.
const BUFFER_SIZE: usize = 32 * 1024;
/// A pooled buffer with less room than this left is renewed before a read: its allocation is
/// taken back once the bytes read into it earlier have been written, or replaced.
const MIN_READ: usize = 8 * 1024;
/// Buffers kept per thread for reuse; more in flight at once are allocated and freed.
const POOLED_PER_THREAD: usize = 64;

thread_local! {
    static BUFFERS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Bytes read and not yet written, held by this thread's splices (tests check that idle
    /// splices hold none; a `#[tokio::test]` runs all its tasks on its own thread).
    static HELD: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

fn take_buffer() -> BytesMut {
    let mut buffer = BUFFERS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_SIZE));
    if buffer.capacity() < MIN_READ {
        // Reuses the allocation in place if nothing read into it is still held.
        buffer.reserve(BUFFER_SIZE);
    }
    buffer
}

fn give_back(buffer: BytesMut) {
    BUFFERS.with(|b| {
        let mut pool = b.borrow_mut();
        if pool.len() < POOLED_PER_THREAD {
            pool.push(buffer);
        }
    });
}

/// Reads what `from` has into a pooled buffer: `None` at the end of the stream. A read that
/// finds nothing holds no buffer while it waits.
fn poll_read_pooled<R>(from: &mut R, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut buffer = take_buffer();
    let read = match tokio_util::io::poll_read_buf(Pin::new(from), cx, &mut buffer) {
        Poll::Ready(Ok(0)) => Poll::Ready(Ok(None)),
        // What was read leaves as its own handle on the allocation; the rest of the buffer
        // goes back for the next read.
        Poll::Ready(Ok(_)) => Poll::Ready(Ok(Some(buffer.split().freeze()))),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    };
    give_back(buffer);
    read
}

/// One end of a splice. The provided methods read into pooled buffers and write through
/// `AsyncWrite`; an end that carries owned buffers itself (a tunnel stream) overrides both to
/// pass them on without copying.
pub trait SpliceEnd: AsyncRead + AsyncWrite + Unpin {
    /// The next bytes to pass on; `None` when the other side has finished sending.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        poll_read_pooled(self, cx)
    }

    /// Writes from the front of `chunk` and advances it past what was written; ready once
    /// something was.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(self).poll_write(cx, chunk))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        chunk.advance(n);
        Poll::Ready(Ok(()))
    }

    /// Ends the connection so that the far side sees it fail, not finish. Called on both ends
    /// when the splice fails or is dropped unfinished; what was written before stays ahead of
    /// the failure as far as the transport keeps it (a reset discards bytes not yet sent, as
    /// TCP's does).
    fn abort(&mut self);
}

impl SpliceEnd for TcpStream {
    /// Closing with `SO_LINGER` 0 sends a TCP reset instead of a FIN.
    fn abort(&mut self) {
        let _ = self.set_zero_linger();
    }
}

/// Copies `a -> b` and `b -> a` until both directions have finished. When one side stops
/// sending (EOF), the other side's write half is shut down and the opposite direction keeps
/// flowing, so a client that half-closes still gets the whole response. A side that stops
/// reading stalls the copy towards it (backpressure) instead of buffering without bound.
/// Bytes read from `a` are added to every counter of `a_to_b` as they flow, likewise `b_to_a`
/// (a connection may be reported under several label sets). If either side fails, or the
/// returned future is dropped before both directions finished, both ends are aborted.
///
/// (A plain function returning `splice_after`'s future, not an `async fn` awaiting it, so that
/// a connection's task does not hold the arguments twice.)
pub fn splice<A, B>(
    a: A,
    b: B,
    a_to_b: &[&Counter],
    b_to_a: &[&Counter],
) -> impl Future<Output = io::Result<()>>
where
    A: SpliceEnd,
    B: SpliceEnd,
{
    splice_after(Bytes::new(), a, b, a_to_b, b_to_a)
}

/// [`splice`], with `first` sent to `b` ahead of what `a` sends (bytes already read from `a`,
/// such as what protocol detection looked at); it is counted in `a_to_b` as it is read.
pub async fn splice_after<A, B>(
    first: Bytes,
    a: A,
    b: B,
    a_to_b: &[&Counter],
    b_to_a: &[&Counter],
) -> io::Result<()>
where
    A: SpliceEnd,
    B: SpliceEnd,
{
    let mut ends = Ends {
        a,
        b,
        finished: false,
    };
    let mut forward = Pump::new(a_to_b);
    let mut backward = Pump::new(b_to_a);
    if !first.is_empty() {
        forward.count(&first);
        forward.hold(first);
    }
    let result = poll_fn(|cx| {
        let f = forward
            .poll(cx, &mut ends.a, &mut ends.b)
            .map_err(|f| (Direction::Forward, f))?;
        let r = backward
            .poll(cx, &mut ends.b, &mut ends.a)
            .map_err(|f| (Direction::Backward, f))?;
        if f.is_ready() && r.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    let (direction, failure) = match result {
        Ok(()) => {
            ends.finished = true;
            return Ok(());
        }
        Err(failed) => failed,
    };
    // Boxed: only a failed splice needs this state, and every connection's task is as large
    // as the largest state of its splice.
    Box::pin(wind_down(
        direction,
        failure,
        &mut ends,
        &mut forward,
        &mut backward,
    ))
    .await
}

/// After a failure: passes on what the failed end still hands out, if that is still
/// possible, and lets what was handed to a tunnel stream go out; then the caller aborts both
/// ends.
async fn wind_down<A, B>(
    direction: Direction,
    failure: Failure,
    ends: &mut Ends<A, B>,
    forward: &mut Pump<'_>,
    backward: &mut Pump<'_>,
) -> io::Result<()>
where
    A: SpliceEnd,
    B: SpliceEnd,
{
    if let Failure::Writing(_) = failure {
        // Writing to an end failed (it was reset): what that end sent before it failed, an
        // early answer to an upload say, still goes the other way first, as TCP hands it to
        // the reader before the reset.
        match direction {
            Direction::Forward => drain_failed(backward, &mut ends.b, &mut ends.a).await,
            Direction::Backward => drain_failed(forward, &mut ends.a, &mut ends.b).await,
        }
    }
    // Let the tasks that send what this splice handed on (a tunnel connection's) run first: a
    // tunnel stream's reset discards what is still queued for it, and bytes the failing side
    // sent before it failed should arrive ahead of the failure. One round: on one worker
    // thread (the default) the connection's task, woken when the bytes were handed to h2,
    // runs before this one resumes; what it cannot write then (a full socket) is discarded,
    // as a reset discards a socket's unsent bytes.
    tokio::task::yield_now().await;
    Err(failure.into_error())
}

/// Passes on, through `pump`, what the `failed` end still hands out: its reads return the
/// bytes it sent before it failed, then the error (they may wait for the runtime to learn
/// that the socket is readable). Its end is not passed on as a FIN. Bounded, in case its read
/// side stays open.
async fn drain_failed<R, W>(pump: &mut Pump<'_>, failed: &mut R, to: &mut W)
where
    R: SpliceEnd,
    W: SpliceEnd,
{
    pump.source_failed = true;
    let drain = poll_fn(|cx| pump.poll(cx, failed, to));
    let _ = tokio::time::timeout(DRAIN_AFTER_FAILURE, drain).await;
}

/// How long a failed splice may go on passing the failed end's last bytes the other way.
const DRAIN_AFTER_FAILURE: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Clone, Copy)]
enum Direction {
    /// `a` to `b`.
    Forward,
    /// `b` to `a`.
    Backward,
}

/// The two ends of a splice, aborted together unless the splice finished.
struct Ends<A: SpliceEnd, B: SpliceEnd> {
    a: A,
    b: B,
    finished: bool,
}

impl<A: SpliceEnd, B: SpliceEnd> Drop for Ends<A, B> {
    fn drop(&mut self) {
        if !self.finished {
            self.a.abort();
            self.b.abort();
        }
    }
}

/// One direction of a splice.
struct Pump<'c> {
    /// Read but not yet written; `None` when nothing is.
    pending: Option<Bytes>,
    /// Written since the last flush.
    unflushed: bool,
    done: bool,
    /// The end this direction reads from has failed: what it still hands out is passed on,
    /// its end is not.
    source_failed: bool,
    counters: &'c [&'c Counter],
}

impl<'c> Pump<'c> {
    fn new(counters: &'c [&'c Counter]) -> Self {
        Pump {
            pending: None,
            unflushed: false,
            done: false,
            source_failed: false,
            counters,
        }
    }

    fn count(&self, chunk: &Bytes) {
        for c in self.counters {
            c.inc_by(chunk.len() as u64);
        }
    }

    fn hold(&mut self, chunk: Bytes) {
        #[cfg(test)]
        HELD.set(HELD.get() + 1);
        self.pending = Some(chunk);
    }

    fn release(&mut self) {
        if self.pending.take().is_some() {
            #[cfg(test)]
            HELD.set(HELD.get() - 1);
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<Result<(), Failure>>
    where
        R: SpliceEnd,
        W: SpliceEnd,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pending.is_none() {
                match from.poll_read_chunk(cx).map_err(Failure::Reading)? {
                    Poll::Pending => {
                        if self.unflushed {
                            ready!(Pin::new(&mut *to).poll_flush(cx)).map_err(Failure::Writing)?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(None) => {
                        // EOF: pass the half-close on, unless the end failed: then the
                        // other side is to see the failure, not a clean end.
                        if !self.source_failed {
                            ready!(Pin::new(&mut *to).poll_shutdown(cx))
                                .map_err(Failure::Writing)?;
                        }
                        self.done = true;
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Some(chunk)) => {
                        self.count(&chunk);
                        self.hold(chunk);
                    }
                }
            }
            if let Some(chunk) = &mut self.pending {
                while !chunk.is_empty() {
                    ready!(to.poll_write_chunk(cx, chunk)).map_err(Failure::Writing)?;
                    self.unflushed = true;
                }
            }
            self.release();
        }
    }
}

/// Why one direction of a splice stopped: the end it reads from failed, or the end it
/// writes to.
enum Failure {
    Reading(io::Error),
    Writing(io::Error),
}

impl Failure {
    fn into_error(self) -> io::Error {
        match self {
            Failure::Reading(e) | Failure::Writing(e) => e,
        }
    }
}

impl Drop for Pump<'_> {
    fn drop(&mut self) {
        self.release();
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

    /// A client, a spliced proxy and a server over loopback TCP.
    async fn spliced_pair() -> (TcpStream, TcpStream) {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = front.accept().await.unwrap();
        let upstream = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = back.accept().await.unwrap();
        tokio::spawn(async move { splice(accepted, upstream, &[], &[]).await });
        (client, server)
    }

    /// Reads to the end: what arrived, and whether it ended in a reset.
    async fn read_until_end(stream: &mut (impl AsyncRead + Unpin)) -> (Vec<u8>, bool) {
        let mut got = Vec::new();
        match stream.read_to_end(&mut got).await {
            Ok(_) => (got, false),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => (got, true),
            Err(e) => panic!("read failed otherwise: {e}"),
        }
    }

    /// A reset on either side is passed on as a reset, after the bytes sent before it; a
    /// clean close is passed on as a clean close.
    #[tokio::test]
    async fn resets_are_passed_on_as_resets_and_fins_as_fins() {
        // The server answers and resets.
        let (mut client, mut server) = spliced_pair().await;
        server.write_all(b"reply").await.unwrap();
        server.set_zero_linger().unwrap();
        drop(server);
        assert_eq!(read_until_end(&mut client).await, (b"reply".to_vec(), true));

        // The client sends and resets.
        let (mut client, mut server) = spliced_pair().await;
        client.write_all(b"request").await.unwrap();
        client.set_zero_linger().unwrap();
        drop(client);
        assert_eq!(
            read_until_end(&mut server).await,
            (b"request".to_vec(), true)
        );

        // Both finish cleanly.
        let (mut client, mut server) = spliced_pair().await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(
            read_until_end(&mut server).await,
            (b"request".to_vec(), false)
        );
        server.write_all(b"reply").await.unwrap();
        drop(server);
        assert_eq!(
            read_until_end(&mut client).await,
            (b"reply".to_vec(), false)
        );
    }

    /// A server that answers an upload early and resets while the client is still sending
    /// (as one that closes with unread data does): the client gets the answer, then the
    /// reset, as it would without the proxy.
    #[tokio::test]
    async fn an_early_answer_before_a_reset_is_passed_on() {
        for _ in 0..20 {
            let (client, mut server) = spliced_pair().await;
            let (mut client_read, mut client_write) = client.into_split();
            let uploader = tokio::spawn(async move {
                let chunk = vec![0u8; 64 * 1024];
                while client_write.write_all(&chunk).await.is_ok() {}
            });
            let mut first = [0u8; 1];
            server.read_exact(&mut first).await.unwrap();
            server.write_all(b"413 too large").await.unwrap();
            server.set_zero_linger().unwrap();
            drop(server);
            assert_eq!(
                read_until_end(&mut client_read).await,
                (b"413 too large".to_vec(), true)
            );
            uploader.await.unwrap();
        }
    }

    /// An in-memory pipe has no way to tell a failure from an end.
    impl SpliceEnd for tokio::io::DuplexStream {
        fn abort(&mut self) {}
    }

    /// Idle splices hold no buffer; bytes still flow through all of them afterwards.
    #[tokio::test]
    async fn idle_splices_hold_no_buffer() {
        let held_before = HELD.get();
        let mut ends = Vec::new();
        for _ in 0..200 {
            let (client, proxy_a) = tokio::io::duplex(64 * 1024);
            let (proxy_b, server) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move { splice(proxy_a, proxy_b, &[], &[]).await });
            ends.push((client, server));
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(HELD.get(), held_before);
        for (client, server) in &mut ends {
            client.write_all(&[1u8; 40_000]).await.unwrap();
            let mut got = vec![0u8; 40_000];
            server.read_exact(&mut got).await.unwrap();
            assert!(got.iter().all(|b| *b == 1));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(HELD.get(), held_before);
    }
}
