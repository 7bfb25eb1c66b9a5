//! The channel's HTTP server: plain HTTP/1.1 (guests speak nothing else), with idle
//! connections closed soon.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How long a guest's connection may sit idle (or take to send a request's head) before it is
/// closed. Guests speak every few seconds and reconnect cheaply; each open connection costs
/// the server its buffers and task, about 20 KiB, which with thousands of agents was most of
/// the controller's memory (docs/benchmarks.md). A request under way (a long poll, say) is not
/// idle.
pub const IDLE_CONNECTION: Duration = Duration::from_secs(2);

/// Serves `router` (the channel's [`crate::Channel::router`]) on `listener` until dropped.
pub async fn serve(listener: TcpListener, router: axum::Router) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE_CONNECTION);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: the next accept may succeed once some close.
                tracing::warn!(error = %e, "status channel: accepting a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connection = builder
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            )
            .into_owned();
        tokio::spawn(async move {
            // A guest that hung up or idled out: nothing to do.
            let _ = connection.await;
        });
    }
}
