//! The bodies in flight: the request body sent upstream (counted, and kept while small so the
//! request can be retried) and the response body sent to the application (counted, watched for
//! `grpc-status` and the request deadline, and the end of the request's record).

use std::mem;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::HeaderMap;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use super::headers::grpc_status;
use super::idle::Active;
use super::pool::Lease;
use super::{BoxError, MAX_REPLAY_BODY, RequestObserver, RequestRecord, flags};

/// A request body already complete in memory; cheap to clone for another attempt.
#[derive(Clone, Debug, Default)]
pub(super) struct Replay {
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
}

/// A copy of a streamed request body, kept while it stays within [`MAX_REPLAY_BODY`].
#[derive(Debug, Default)]
pub(super) struct Tape {
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<HeaderMap>,
    /// The body ended (every frame was read).
    complete: bool,
    /// The body outgrew the limit; the copy was dropped.
    overflow: bool,
}

impl Tape {
    fn record(&mut self, data: &Bytes) {
        if self.overflow {
            return;
        }
        if self.len + data.len() > MAX_REPLAY_BODY {
            self.overflow = true;
            self.chunks = Vec::new();
            return;
        }
        self.len += data.len();
        self.chunks.push(data.clone());
    }

    /// The whole body, if it was read to its end within the limit.
    pub(super) fn replay(&self) -> Option<Replay> {
        if !self.complete || self.overflow {
            return None;
        }
        let data = match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => Bytes::from(many.concat()),
        };
        Some(Replay {
            data,
            trailers: self.trailers.clone(),
        })
    }
}

/// The body of one upstream attempt.
pub(super) enum RequestBody {
    Empty,
    Replay {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    /// The application's body, read as the upstream takes it.
    Stream {
        inner: Incoming,
        /// Bytes read from the application (for the record).
        counted: Arc<AtomicU64>,
        tape: Option<Arc<Mutex<Tape>>>,
    },
}

impl RequestBody {
    pub(super) fn replay(r: &Replay) -> RequestBody {
        if r.data.is_empty() && r.trailers.is_none() {
            return RequestBody::Empty;
        }
        RequestBody::Replay {
            data: (!r.data.is_empty()).then(|| r.data.clone()),
            trailers: r.trailers.clone(),
        }
    }

    pub(super) fn is_stream(&self) -> bool {
        matches!(self, RequestBody::Stream { .. })
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Replay { data, trailers } => {
                if let Some(d) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            RequestBody::Stream {
                inner,
                counted,
                tape,
            } => {
                let frame = ready!(Pin::new(inner).poll_frame(cx));
                let tape = tape
                    .as_ref()
                    .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()));
                match frame {
                    None => {
                        if let Some(mut t) = tape {
                            t.complete = true;
                        }
                        Poll::Ready(None)
                    }
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            counted.fetch_add(data.len() as u64, Ordering::Relaxed);
                            if let Some(mut t) = tape {
                                t.record(data);
                            }
                        } else if let (Some(trailers), Some(mut t)) = (frame.trailers_ref(), tape) {
                            t.trailers = Some(trailers.clone());
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Replay { data, trailers } => data.is_none() && trailers.is_none(),
            // The end is seen by reading it, so that the tape knows the body is complete.
            RequestBody::Stream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Replay { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestBody::Stream { inner, .. } => inner.size_hint(),
        }
    }
}

/// The record of one request, completed as the request goes and emitted exactly once: when the
/// response is done, or when the request is abandoned (then with `DC` unless a flag was set).
pub(super) struct Recorder {
    observer: Arc<dyn RequestObserver>,
    start: Instant,
    pub record: RequestRecord,
    pub request_bytes: Arc<AtomicU64>,
    emitted: bool,
    /// The request counts as in flight on its connection until the record is done.
    _active: Active,
}

impl Recorder {
    pub(super) fn new(
        observer: Arc<dyn RequestObserver>,
        method: http::Method,
        start: Instant,
        active: Active,
    ) -> Recorder {
        Recorder {
            observer,
            start,
            record: RequestRecord {
                target: None,
                method,
                uri: Default::default(),
                host: None,
                traceparent: None,
                response_code: 0,
                grpc_status: None,
                duration: Default::default(),
                request_bytes: 0,
                response_bytes: 0,
                retries: 0,
                response_flags: flags::DOWNSTREAM_CONNECTION_TERMINATION,
            },
            request_bytes: Arc::new(AtomicU64::new(0)),
            emitted: false,
            _active: active,
        }
    }

    fn emit(&mut self) {
        if mem::replace(&mut self.emitted, true) {
            return;
        }
        self.record.duration = self.start.elapsed();
        self.record.request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.observer.observe(self.record.clone());
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.emit();
    }
}

/// The response body sent to the application.
pub(super) struct ResponseBody {
    inner: Inner,
    recorder: Option<Recorder>,
    /// The upstream HTTP/1.1 connection, back to the pool once the body has been read through.
    lease: Option<Lease>,
    /// The request deadline: a body still flowing when it passes is cut (`UT`).
    deadline: Option<Pin<Box<Sleep>>>,
    ended: bool,
    failure: Option<&'static str>,
}

enum Inner {
    Upstream(Incoming),
    Local(Option<Bytes>),
}

impl ResponseBody {
    /// A body generated here (local replies, upgrades): nothing to watch.
    pub(super) fn local(data: Bytes, recorder: Recorder) -> ResponseBody {
        ResponseBody {
            inner: Inner::Local((!data.is_empty()).then_some(data)),
            recorder: Some(recorder),
            lease: None,
            deadline: None,
            ended: false,
            failure: None,
        }
    }

    pub(super) fn upstream(
        body: Incoming,
        recorder: Recorder,
        lease: Option<Lease>,
        deadline: Option<tokio::time::Instant>,
    ) -> ResponseBody {
        ResponseBody {
            inner: Inner::Upstream(body),
            recorder: Some(recorder),
            lease,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            ended: false,
            failure: None,
        }
    }

    fn inner_ended(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Local(d) => d.is_none(),
        }
    }

    /// The body has been read through: the upstream connection can serve another request.
    fn end(&mut self) {
        self.ended = true;
        if let Some(lease) = self.lease.take() {
            lease.release();
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        let polled = match &mut this.inner {
            Inner::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Inner::Upstream(body) => {
                // Checked first: a response that keeps flowing is cut at the deadline too.
                if let Some(deadline) = &mut this.deadline
                    && deadline.as_mut().poll(cx).is_ready()
                {
                    this.failure = Some(flags::UPSTREAM_TIMEOUT);
                    this.lease = None;
                    return Poll::Ready(Some(Err("request timeout".into())));
                }
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(Some(Err(e))) => {
                        this.failure = Some(flags::UPSTREAM_CONNECTION_TERMINATION);
                        Poll::Ready(Some(Err(BoxError::from(e))))
                    }
                    polled => polled.map(|f| f.map(|f| f.map_err(BoxError::from))),
                }
            }
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(r) = &mut this.recorder {
                    if let Some(data) = frame.data_ref() {
                        r.record.response_bytes += data.len() as u64;
                    } else if let Some(status) = frame.trailers_ref().and_then(grpc_status) {
                        r.record.grpc_status = Some(status);
                    }
                }
                if this.inner_ended() {
                    this.end();
                }
            }
            Poll::Ready(None) => this.end(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner_ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Local(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // An empty body is never polled: its end is only seen here.
        if !self.ended && self.failure.is_none() && self.inner_ended() {
            self.end();
        }
        if let Some(mut recorder) = self.recorder.take() {
            if let Some(flag) = self.failure {
                recorder.record.response_flags = flag;
            } else if !self.ended {
                recorder.record.response_flags = flags::DOWNSTREAM_CONNECTION_TERMINATION;
            }
            recorder.emit();
        }
    }
}
