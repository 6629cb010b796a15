//! A plain HTTP/1.1 GET (hyper) for the agent's few client requests — the ECS agent's local
//! endpoints, `mesh-agent stat` scraping an agent — whose body is kept in a buffer that is
//! wiped when dropped: credentials responses carry secret keys.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use zeroize::Zeroizing;

/// Larger answers are refused: the introspection API lists one node's tasks, and a
/// credentials answer is a few KiB.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// A valid ECS endpoint URL, shown in the errors about invalid ones.
const ECS_URL_EXAMPLE: &str = "http://127.0.0.1:51678";

/// `http://<ip>:<port>` with no path: the only form the local ECS endpoints need.
pub fn parse_http_url(url: &str) -> anyhow::Result<SocketAddr> {
    let (addr, uri) = http_address(url, ECS_URL_EXAMPLE)?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        bail!("`{url}`: give only scheme, address and port, e.g. {ECS_URL_EXAMPLE}");
    }
    Ok(addr)
}

/// The address an `http://` URL names, and the parsed URL. The host must be an IP address or
/// `localhost` (127.0.0.1); other names are refused rather than resolved: the release agent is
/// a static executable, whose C library could only resolve them by loading the host's
/// name-service modules, which must come from the very glibc that was linked in
/// (docs/architecture.md, "One static executable"). `example` shows a valid URL in the error.
pub fn http_address(url: &str, example: &str) -> anyhow::Result<(SocketAddr, Uri)> {
    let uri: Uri = url
        .parse()
        .map_err(|e| anyhow!("`{url}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("`{url}`: only http:// is supported, e.g. {example}");
    }
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("`{url}` has no address, e.g. {example}"))?;
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host();
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| {
                anyhow!(
                    "`{url}`: the host must be an IP address or localhost, e.g. {example}; \
                     mesh-agent does not resolve host names"
                )
            })?
    };
    Ok((SocketAddr::new(ip, port), uri))
}

/// GETs `path` from `addr`; the whole exchange (connect, request, body) within `timeout`.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(StatusCode, Zeroizing<Vec<u8>>)> {
    tokio::time::timeout(timeout, get_inner(addr, path))
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path} timed out after {timeout:?}"))?
}

async fn get_inner(
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(StatusCode, Zeroizing<Vec<u8>>)> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let driver = tokio::spawn(connection);
    let request = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut out = Zeroizing::new(Vec::new());
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the response body")?;
        if let Some(data) = frame.data_ref() {
            if out.len() + data.len() > MAX_BODY {
                bail!("the answer from {addr}{path} is larger than {MAX_BODY} bytes");
            }
            // Grow by copying into a new wiped buffer, never by reallocating in place, so no
            // unwiped copy of the secret-bearing bytes is left behind in freed memory.
            if out.capacity() < out.len() + data.len() {
                let mut bigger = Zeroizing::new(Vec::with_capacity(
                    (out.len() + data.len()).next_power_of_two().max(4096),
                ));
                bigger.extend_from_slice(&out);
                out = bigger;
            }
            out.extend_from_slice(data);
        }
    }
    driver.abort();
    Ok((status, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:51678").unwrap(),
            "127.0.0.1:51678".parse().unwrap()
        );
        assert_eq!(
            parse_http_url("http://[::1]:51679/").unwrap(),
            "[::1]:51679".parse().unwrap()
        );
        assert_eq!(
            parse_http_url("http://localhost:51678").unwrap(),
            "127.0.0.1:51678".parse().unwrap()
        );
        for bad in ["https://127.0.0.1:1", "http://127.0.0.1:1/v1", "nonsense"] {
            assert!(parse_http_url(bad).is_err(), "{bad}");
        }
        let err = parse_http_url("http://ecs-agent:51678")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "the host must be an IP address or localhost, e.g. http://127.0.0.1:51678"
            ),
            "{err}"
        );
    }
}
