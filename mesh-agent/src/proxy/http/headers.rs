//! Header rewriting between the application and the upstream: hop-by-hop headers, the request
//! target for each upstream protocol, and W3C trace context.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme, Uri};
use http::{Version, request};

use super::{HttpVersion, Target};

/// Connection-specific headers (RFC 9110 7.6.1, RFC 9113 8.2.2). `te` is handled apart.
const HOP_BY_HOP: [HeaderName; 4] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
];

const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

pub(super) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Removes the headers meant for one connection only: the fixed set and the ones the
/// `Connection` header names. With `keep_upgrade`, an HTTP/1 upgrade (`Connection: upgrade` and
/// `Upgrade`) is carried through.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let nominated: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in nominated {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        // A `Connection` header may not remove end-to-end essentials.
        if name == header::HOST || name == TRACEPARENT {
            continue;
        }
        headers.remove(name);
    }
    let upgrade = keep_upgrade
        .then(|| headers.remove(header::UPGRADE))
        .flatten();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(PROXY_CONNECTION);
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Rewrites the request head for the upstream protocol: hop-by-hop headers out, `TE: trailers`
/// kept only for HTTP/2 (gRPC needs it), the request target in the form the protocol wants,
/// with the `Host` (HTTP/1.1) or `:authority` (HTTP/2) the application used.
pub(super) fn prepare_request(
    head: &mut request::Parts,
    upstream: HttpVersion,
    target: &Target,
    keep_upgrade: bool,
) {
    let te_trailers = head
        .headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(&mut head.headers, keep_upgrade);
    head.headers.remove(header::TE);

    // The authority the application addressed: `Host`, else the request target's, else the
    // destination address (an HTTP/1.0 request may have neither).
    let authority = head
        .headers
        .get(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .or_else(|| head.uri.authority().cloned())
        .unwrap_or_else(|| {
            Authority::try_from(target.addr.to_string()).expect("a socket address is an authority")
        });
    let path = head
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    match upstream {
        HttpVersion::Http1 => {
            head.version = Version::HTTP_11;
            if !head.headers.contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(authority.as_str())
            {
                head.headers.insert(header::HOST, host);
            }
            // Origin form, as a server (not a proxy) expects it; CONNECT keeps its authority.
            if head.method != http::Method::CONNECT {
                head.uri = Uri::from(path);
            }
        }
        HttpVersion::Http2 => {
            head.version = Version::HTTP_2;
            head.headers.remove(header::HOST);
            if te_trailers {
                head.headers
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            let scheme = head.uri.scheme().cloned().unwrap_or(Scheme::HTTP);
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(scheme);
            parts.authority = Some(authority);
            parts.path_and_query = Some(path);
            if let Ok(uri) = Uri::from_parts(parts) {
                head.uri = uri;
            }
        }
    }
}

/// Keeps a valid `traceparent`; replaces a missing or invalid one with a new trace (and drops
/// the `tracestate` that went with an invalid one, as W3C Trace Context requires).
pub(super) fn ensure_traceparent(headers: &mut HeaderMap) {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let valid = match (values.next(), values.next()) {
        (Some(v), None) => valid_traceparent(v.as_bytes()),
        _ => false,
    };
    if !valid {
        if headers.contains_key(TRACEPARENT) {
            headers.remove(TRACESTATE);
        }
        headers.insert(TRACEPARENT, new_traceparent());
    }
}

/// A new sampled trace: random 16-byte trace id, random 8-byte parent id.
pub(super) fn new_traceparent() -> HeaderValue {
    let trace = loop {
        let t = fastrand::u128(..);
        if t != 0 {
            break t;
        }
    };
    let span = loop {
        let s = fastrand::u64(..);
        if s != 0 {
            break s;
        }
    };
    HeaderValue::try_from(format!("00-{trace:032x}-{span:016x}-01"))
        .expect("hex digits are a valid header value")
}

/// W3C Trace Context `traceparent` (version 00, or a later version read as 00 allows).
pub(super) fn valid_traceparent(v: &[u8]) -> bool {
    let lower_hex = |s: &[u8]| {
        s.iter()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
    };
    let not_zero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return false;
    }
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    if !(lower_hex(version) && lower_hex(trace) && lower_hex(parent) && lower_hex(flags)) {
        return false;
    }
    if version == b"ff" || !not_zero(trace) || !not_zero(parent) {
        return false;
    }
    match version {
        b"00" => v.len() == 55,
        _ => v.len() == 55 || v[55] == b'-',
    }
}

/// The `grpc-status` in a header map (trailers, or the headers of a trailers-only response).
pub(super) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_nominated_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("svc:8080"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host", "x-kept"]);
    }

    #[test]
    fn an_upgrade_can_be_carried() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade, x-a"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-a", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert!(!h.contains_key("x-a"));
    }

    #[test]
    fn request_target_follows_the_upstream_protocol() {
        let target = Target {
            name: "b".into(),
            addr: "10.0.0.1:80".parse().unwrap(),
            version: HttpVersion::Http1,
        };
        // HTTP/2 from the application to an HTTP/1.1 upstream: authority becomes Host.
        let (mut head, ()) = http::Request::builder()
            .uri("http://svc.local:8080/a?b=1")
            .header("te", "trailers")
            .body(())
            .unwrap()
            .into_parts();
        prepare_request(&mut head, HttpVersion::Http1, &target, false);
        assert_eq!(head.uri, "/a?b=1");
        assert_eq!(head.headers[header::HOST], "svc.local:8080");
        assert!(!head.headers.contains_key(header::TE));

        // HTTP/1.1 to HTTP/2: Host becomes :authority, TE: trailers stays.
        let (mut head, ()) = http::Request::builder()
            .uri("/a")
            .header(header::HOST, "svc.local:8080")
            .header("te", "trailers")
            .body(())
            .unwrap()
            .into_parts();
        prepare_request(&mut head, HttpVersion::Http2, &target, false);
        assert_eq!(head.uri, "http://svc.local:8080/a");
        assert!(!head.headers.contains_key(header::HOST));
        assert_eq!(head.headers[header::TE], "trailers");

        // Neither Host nor authority: the destination address.
        let (mut head, ()) = http::Request::builder()
            .uri("/")
            .body(())
            .unwrap()
            .into_parts();
        prepare_request(&mut head, HttpVersion::Http1, &target, false);
        assert_eq!(head.headers[header::HOST], "10.0.0.1:80");
    }

    #[test]
    fn traceparent_validation() {
        let ok = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(ok));
        assert!(valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
        assert!(!valid_traceparent(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"
        ));
        assert!(!valid_traceparent(
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"
        ));
        assert!(!valid_traceparent(
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(b"garbage"));
        for _ in 0..100 {
            assert!(valid_traceparent(new_traceparent().as_bytes()));
        }

        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static("bad"));
        h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
        ensure_traceparent(&mut h);
        assert!(valid_traceparent(h[TRACEPARENT].as_bytes()));
        assert!(!h.contains_key(TRACESTATE));

        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_bytes(ok).unwrap());
        h.insert(TRACESTATE, HeaderValue::from_static("a=b"));
        ensure_traceparent(&mut h);
        assert_eq!(h[TRACEPARENT].as_bytes(), ok);
        assert_eq!(h[TRACESTATE], "a=b");
    }
}
