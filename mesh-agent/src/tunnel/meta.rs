//! What the dialling agent tells the receiving agent about a stream, beyond its target: CONNECT
//! request headers. The peer agent is authenticated (it holds the source task's certificate),
//! but the values only ever become labels, so they are still checked: a value that is not a
//! short, printable token is dropped and the label says `unknown`.

use http::{HeaderMap, HeaderName, HeaderValue};
use std::sync::Arc;

const PROTOCOL: HeaderName = HeaderName::from_static("mesh-protocol");
const SOURCE_WORKLOAD: HeaderName = HeaderName::from_static("mesh-source-workload");
const SOURCE_VERSION: HeaderName = HeaderName::from_static("mesh-source-version");
const SERVICE: HeaderName = HeaderName::from_static("mesh-service");

/// Longest value kept (a DNS name is at most 253 characters).
const MAX_VALUE: usize = 253;

/// The HTTP version of a stream the source agent proxies as HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamProtocol {
    Http1,
    Http2,
}

/// The stream's description.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamMeta {
    /// Set when the stream carries HTTP that the source agent proxies request by request: the
    /// receiving agent then serves it as HTTP too and reports each request
    /// (`reporter="destination"`). Absent: opaque bytes.
    pub protocol: Option<StreamProtocol>,
    /// The source task's `workload` and `version` labels.
    pub source_workload: Option<Arc<str>>,
    pub source_version: Option<Arc<str>>,
    /// The service the requests were addressed to (`destination_service`).
    pub service: Option<Arc<str>>,
}

impl StreamMeta {
    pub fn write_to(&self, headers: &mut HeaderMap) {
        if let Some(p) = self.protocol {
            let value = match p {
                StreamProtocol::Http1 => "http1",
                StreamProtocol::Http2 => "http2",
            };
            headers.insert(PROTOCOL, HeaderValue::from_static(value));
        }
        for (name, value) in [
            (SOURCE_WORKLOAD, &self.source_workload),
            (SOURCE_VERSION, &self.source_version),
            (SERVICE, &self.service),
        ] {
            if let Some(v) = value.as_deref().filter(|v| acceptable(v))
                && let Ok(v) = HeaderValue::from_str(v)
            {
                headers.insert(name, v);
            }
        }
    }

    pub fn read_from(headers: &HeaderMap) -> StreamMeta {
        let text = |name: &HeaderName| -> Option<Arc<str>> {
            let v = headers.get(name)?.to_str().ok()?;
            acceptable(v).then(|| v.into())
        };
        StreamMeta {
            protocol: match headers.get(&PROTOCOL).map(HeaderValue::as_bytes) {
                Some(b"http1") => Some(StreamProtocol::Http1),
                Some(b"http2") => Some(StreamProtocol::Http2),
                _ => None,
            },
            source_workload: text(&SOURCE_WORKLOAD),
            source_version: text(&SOURCE_VERSION),
            service: text(&SERVICE),
        }
    }
}

/// A label value: 1 to 253 characters of letters, digits and `.-_:/`.
fn acceptable(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VALUE
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:/".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_headers() {
        let meta = StreamMeta {
            protocol: Some(StreamProtocol::Http2),
            source_workload: Some("service-a".into()),
            source_version: Some("7".into()),
            service: Some("serviceb.apps.local".into()),
        };
        let mut headers = HeaderMap::new();
        meta.write_to(&mut headers);
        assert_eq!(StreamMeta::read_from(&headers), meta);
    }

    #[test]
    fn odd_values_are_dropped_not_trusted() {
        let mut headers = HeaderMap::new();
        headers.insert(PROTOCOL, HeaderValue::from_static("gopher"));
        headers.insert(SOURCE_WORKLOAD, HeaderValue::from_static("a b"));
        headers.insert(SERVICE, HeaderValue::from_str(&"x".repeat(300)).unwrap());
        headers.insert(SOURCE_VERSION, HeaderValue::from_static("3"));
        let meta = StreamMeta::read_from(&headers);
        assert_eq!(
            meta,
            StreamMeta {
                source_version: Some("3".into()),
                ..StreamMeta::default()
            }
        );
        // Nothing at all: an opaque stream from an older agent.
        assert_eq!(
            StreamMeta::read_from(&HeaderMap::new()),
            StreamMeta::default()
        );
    }
}
