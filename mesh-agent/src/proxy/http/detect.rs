//! Protocol detection from the first bytes the application sends.
//!
//! Detection reads (never peeks, so it works on any stream) and gives every byte it read back:
//! inside [`Prefixed`] when the connection is HTTP, as `prefix` when it is not. A peer that says
//! nothing (a server-speaks-first protocol such as MySQL or SMTP) costs at most the timeout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::HttpVersion;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request-line starts recognised as HTTP/1 (RFC 9110 methods and PATCH). Other tokens are not
/// guessed at: text protocols (Redis inline commands, SMTP) also start with a word and a space.
const HTTP1_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

/// What the first bytes of a connection are.
#[derive(Debug)]
pub enum Detection<S> {
    /// HTTP; the stream replays what detection read.
    Http(HttpVersion, Prefixed<S>),
    /// Not HTTP, or nothing (enough) within the timeout, or end of stream: `prefix` holds the
    /// bytes read from `stream`, to be sent on before anything else.
    Opaque {
        stream: S,
        prefix: Bytes,
        timed_out: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Http(HttpVersion),
    Opaque,
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    if buf.starts_with(H2_PREFACE) {
        return Verdict::Http(HttpVersion::Http2);
    }
    if HTTP1_METHODS.iter().any(|m| buf.starts_with(m)) {
        return Verdict::Http(HttpVersion::Http1);
    }
    let could_be = |candidate: &[u8]| candidate.len() > buf.len() && candidate.starts_with(buf);
    if could_be(H2_PREFACE) || HTTP1_METHODS.iter().any(|m| could_be(m)) {
        Verdict::NeedMore
    } else {
        Verdict::Opaque
    }
}

/// Reads from `stream` until its protocol is known or `timeout` has passed since the call.
pub async fn detect<S>(mut stream: S, timeout: Duration) -> io::Result<Detection<S>>
where
    S: AsyncRead + Unpin,
{
    let deadline = Instant::now() + timeout;
    let mut read = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match classify(&read) {
            Verdict::Http(version) => {
                return Ok(Detection::Http(
                    version,
                    Prefixed::new(Bytes::from(read), stream),
                ));
            }
            Verdict::Opaque => return Ok(opaque(stream, read, false)),
            Verdict::NeedMore => {}
        }
        // A read future drops nothing when cancelled: data is only taken on completion.
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Ok(opaque(stream, read, true)),
            Ok(Ok(0)) => return Ok(opaque(stream, read, false)),
            Ok(Ok(n)) => read.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

fn opaque<S>(stream: S, read: Vec<u8>, timed_out: bool) -> Detection<S> {
    Detection::Opaque {
        stream,
        prefix: Bytes::from(read),
        timed_out,
    }
}

/// A stream that first yields `prefix`, then reads from the inner stream; writes go straight to
/// the inner stream.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let head = self.prefix.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
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
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(classify(b""), Verdict::NeedMore);
        assert_eq!(classify(b"G"), Verdict::NeedMore);
        assert_eq!(classify(b"GET"), Verdict::NeedMore);
        assert_eq!(classify(b"GET /"), Verdict::Http(HttpVersion::Http1));
        assert_eq!(classify(b"DELETE /x"), Verdict::Http(HttpVersion::Http1));
        assert_eq!(classify(b"PRI * HTTP/2.0"), Verdict::NeedMore);
        assert_eq!(classify(H2_PREFACE), Verdict::Http(HttpVersion::Http2));
        // "PRI " is no HTTP/1 method of ours, and a broken preface is not HTTP/2.
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Verdict::Opaque);
        assert_eq!(classify(b"GETX"), Verdict::Opaque);
        assert_eq!(classify(b"get /"), Verdict::Opaque);
        assert_eq!(classify(b"\x16\x03\x01"), Verdict::Opaque); // TLS ClientHello
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Verdict::Opaque); // Redis
        assert_eq!(classify(b"SET k v\r\n"), Verdict::Opaque);
    }
}
