//! A lean HTTP/1.1 client on a blocking socket: one request at a time per connection,
//! responses framed by `Content-Length` (what hyper sends for a full body). It allocates
//! once per connection, never per request. Anything else (chunked bodies, a status other
//! than 200, a short body) is an error the caller counts.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// `POST /bench` with a body of `size` bytes: the request every load mode sends.
pub fn post_request(target: SocketAddr, size: usize) -> Vec<u8> {
    let mut request = format!(
        "POST /bench HTTP/1.1\r\nHost: {target}\r\nContent-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
    )
    .into_bytes();
    request.resize(request.len() + size, b'x');
    request
}

#[derive(Debug)]
pub enum Error {
    Connect(io::Error),
    Io(io::Error),
    /// The server closed the connection before a whole response arrived.
    Closed,
    Status(u16),
    Protocol(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "connect: {e}"),
            Error::Io(e) => write!(f, "i/o: {e}"),
            Error::Closed => f.write_str("connection closed before the whole response"),
            Error::Status(code) => write!(f, "status {code}"),
            Error::Protocol(what) => write!(f, "bad response: {what}"),
        }
    }
}

/// One client connection.
pub struct Conn {
    stream: TcpStream,
    timeout: Duration,
    buf: Vec<u8>,
    /// Bytes of `buf` holding data read but not yet consumed.
    filled: usize,
    /// False once the server said `Connection: close`.
    reusable: bool,
}

/// Connects with `TCP_NODELAY` and `timeout` on the connect and on every later read and write.
pub fn connect(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

impl Conn {
    pub fn connect(target: SocketAddr, timeout: Duration) -> Result<Conn, Error> {
        let stream = connect(target, timeout).map_err(Error::Connect)?;
        Ok(Conn {
            stream,
            timeout,
            buf: vec![0; 16 * 1024],
            filled: 0,
            reusable: true,
        })
    }

    pub fn reusable(&self) -> bool {
        self.reusable
    }

    /// Sends `request` and reads one whole response; returns its body length.
    pub fn exchange(&mut self, request: &[u8]) -> Result<usize, Error> {
        self.stream.write_all(request).map_err(Error::Io)?;
        let head_len = loop {
            if let Some(end) = find_head_end(&self.buf[..self.filled]) {
                break end;
            }
            if self.filled == self.buf.len() {
                return Err(Error::Protocol("response head larger than 16 KiB"));
            }
            self.fill()?;
        };
        let head = parse_head(&self.buf[..head_len])?;
        if !head.keep_alive {
            self.reusable = false;
        }
        let total = head_len + head.content_length;
        if total > self.buf.len() {
            self.buf.resize(total, 0);
        }
        while self.filled < total {
            self.fill()?;
        }
        self.buf.copy_within(total..self.filled, 0);
        self.filled -= total;
        if head.status != 200 {
            return Err(Error::Status(head.status));
        }
        Ok(head.content_length)
    }

    fn fill(&mut self) -> Result<(), Error> {
        match read_patiently(&mut self.stream, &mut self.buf[self.filled..], self.timeout) {
            Ok(0) => Err(Error::Closed),
            Ok(n) => {
                self.filled += n;
                Ok(())
            }
            Err(e) => Err(Error::Io(e)),
        }
    }
}

/// A read that fails with a timeout only once `timeout` has passed. A blocking read on a
/// socket in a BPF socket map (the agents' `capture.loopback_redirect`) can return EAGAIN
/// early when the socket is woken without data; the benchmark must not count that as an
/// error of the proxy.
pub fn read_patiently(
    stream: &mut TcpStream,
    buf: &mut [u8],
    timeout: Duration,
) -> io::Result<usize> {
    let started = std::time::Instant::now();
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && started.elapsed() < timeout =>
            {
                continue;
            }
            other => return other,
        }
    }
}

/// `read_exact` with [`read_patiently`].
pub fn read_exact_patiently(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    timeout: Duration,
) -> io::Result<()> {
    while !buf.is_empty() {
        match read_patiently(stream, buf, timeout)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

impl Conn {}

/// The length of the response head including its blank line, once it is complete.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

#[derive(Debug, PartialEq)]
struct Head {
    status: u16,
    content_length: usize,
    keep_alive: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, Error> {
    let text = std::str::from_utf8(head).map_err(|_| Error::Protocol("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split(' ');
    let version = words.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(Error::Protocol("not an HTTP/1.x status line"));
    }
    let status = words
        .next()
        .and_then(|code| code.parse().ok())
        .ok_or(Error::Protocol("no status code"))?;
    let mut content_length = None;
    let mut keep_alive = version == "HTTP/1.1";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse()
                    .map_err(|_| Error::Protocol("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Error::Protocol("transfer-encoding is not supported"));
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        }
    }
    Ok(Head {
        status,
        content_length: content_length.ok_or(Error::Protocol("no content-length"))?,
        keep_alive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    #[test]
    fn parses_heads() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1024\r\ndate: x\r\n\r\n";
        assert_eq!(find_head_end(head), Some(head.len()));
        assert_eq!(
            parse_head(head).unwrap(),
            Head {
                status: 200,
                content_length: 1024,
                keep_alive: true
            }
        );
        let close = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let parsed = parse_head(close).unwrap();
        assert_eq!((parsed.status, parsed.keep_alive), (503, false));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn exchanges_back_to_back_responses_on_one_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let request = post_request(addr, 10);
            for body in ["0123456789", "abc"] {
                let mut got = vec![0; request.len()];
                s.read_exact(&mut got).unwrap();
                assert_eq!(got, request);
                // The response arrives in two pieces, the head split in the middle.
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let (a, b) = response.as_bytes().split_at(20);
                s.write_all(a).unwrap();
                thread::sleep(Duration::from_millis(5));
                s.write_all(b).unwrap();
            }
        });
        let mut conn = Conn::connect(addr, Duration::from_secs(5)).unwrap();
        let request = post_request(addr, 10);
        assert_eq!(conn.exchange(&request).unwrap(), 10);
        assert_eq!(conn.exchange(&request).unwrap(), 3);
        assert!(matches!(
            conn.exchange(&request),
            Err(Error::Closed | Error::Io(_))
        ));
        server.join().unwrap();
    }
}
