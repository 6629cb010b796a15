//! The idle timeout of an application connection: closed gracefully once no request has been
//! in flight for the timeout (HTTP/1.1: the keep-alive connection closes; HTTP/2: GOAWAY).

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The requests of one connection.
pub(super) struct Activity {
    in_flight: AtomicUsize,
    /// When the last request ended (or the connection started).
    last: Mutex<Instant>,
}

/// One request in flight, until its response is done (or abandoned).
pub(super) struct Active(Arc<Activity>);

impl Activity {
    pub(super) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        })
    }

    pub(super) fn begin(self: &Arc<Self>) -> Active {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Active(self.clone())
    }

    /// When the connection is due to close; `None` while a request is in flight.
    fn expiry(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        Some(*self.last.lock().unwrap_or_else(|p| p.into_inner()) + idle)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Drives `connection` to its end, shutting it down gracefully once it has been idle for
/// `idle`.
pub(super) async fn run<F: Future>(
    mut connection: Pin<&mut F>,
    shutdown: impl Fn(Pin<&mut F>),
    activity: &Activity,
    idle: Option<Duration>,
) -> F::Output {
    let Some(idle) = idle else {
        return connection.await;
    };
    loop {
        let check = activity
            .expiry(idle)
            .unwrap_or_else(|| Instant::now() + idle);
        tokio::select! {
            out = connection.as_mut() => return out,
            _ = tokio::time::sleep_until(check) => {
                if activity.expiry(idle).is_some_and(|at| at <= Instant::now()) {
                    shutdown(connection.as_mut());
                    return connection.await;
                }
            }
        }
    }
}
