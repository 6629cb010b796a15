//! Inbound HTTP: a tunnel stream whose requests the source agent proxies one by one
//! (`mesh-protocol` on its CONNECT) is served as HTTP here too, so that every request is also
//! reported by the destination's agent (`reporter="destination"`), as a sidecar at the
//! destination would. No routing happens here: the source agent chose this endpoint; each
//! request goes to the task's port, over the connection made when the stream was accepted
//! (and new ones from the task's netns if the application closes it).

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Mesh;
use super::http::{self, Decision, HttpVersion, Target};
use super::l7::{FixedDestination, NoRetries, Observer};
use super::splice::Metered;
use crate::metrics::TcpLabels;
use crate::netns::NetnsWorker;
use crate::tunnel::StreamProtocol;

/// One inbound HTTP stream.
pub struct InboundHttp<'a> {
    pub protocol: StreamProtocol,
    /// The stream's TCP labels (reporter `destination`); request labels derive from them.
    pub labels: &'a TcpLabels,
    /// The `destination_service` the source agent named (else the destination workload).
    pub service: Option<Arc<str>>,
    pub netns: Arc<NetnsWorker>,
    pub connect_to: SocketAddr,
    pub connect_timeout: Duration,
}

/// Serves the stream until it closes. `upstream` is the connection to the task, already open;
/// `received`/`sent` count the stream's bytes.
pub async fn serve_inbound_http<T>(
    mesh: &Arc<Mesh>,
    stream: InboundHttp<'_>,
    tunnel: T,
    upstream: TcpStream,
    received: &[&Counter],
    sent: &[&Counter],
) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let labels = stream.labels;
    let version = match stream.protocol {
        StreamProtocol::Http1 => HttpVersion::Http1,
        StreamProtocol::Http2 => HttpVersion::Http2,
    };
    let _ = upstream.set_nodelay(true);
    let router = Arc::new(http::Fixed(Decision::to(Target {
        name: labels.destination_workload.as_str().into(),
        addr: stream.connect_to,
        version,
    })));
    let connector = TaskConnector {
        opened: Mutex::new(Some(upstream)),
        netns: stream.netns,
        timeout: stream.connect_timeout,
    };
    let pool = http::Pool::new(
        connector,
        http::PoolOptions {
            idle_timeout: super::l7::POOL_IDLE,
            ..http::PoolOptions::default()
        },
    );
    let observer = Arc::new(Observer {
        mesh: mesh.clone(),
        reporter: "destination",
        source_workload: labels.source_workload.as_str().into(),
        source_version: labels.source_version.as_str().into(),
        source_principal: labels.source_principal.as_str().into(),
        service: stream
            .service
            .unwrap_or_else(|| labels.destination_workload.as_str().into()),
        destination: Some(FixedDestination {
            workload: labels.destination_workload.clone(),
            version: labels.destination_version.clone(),
            principal: labels.destination_principal.clone(),
        }),
    });
    let tunnel = Metered::new(tunnel, received, sent);
    let options = http::ServeOptions::default();
    http::serve(
        tunnel,
        version,
        router,
        pool,
        Arc::new(NoRetries),
        observer,
        &options,
    )
    .await
}

/// The connection opened when the stream was accepted, then new ones from the task's netns.
struct TaskConnector {
    opened: Mutex<Option<TcpStream>>,
    netns: Arc<NetnsWorker>,
    timeout: Duration,
}

impl http::Connector for TaskConnector {
    type Io = TcpStream;

    async fn connect(&self, target: &Target) -> io::Result<TcpStream> {
        let opened = self.opened.lock().unwrap_or_else(|p| p.into_inner()).take();
        match opened {
            Some(s) => Ok(s),
            None => {
                let s = self.netns.connect(target.addr, self.timeout).await?;
                let _ = s.set_nodelay(true);
                Ok(s)
            }
        }
    }
}
