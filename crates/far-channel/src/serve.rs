//! How the channel is served: HTTP/1.1, a connection closed once it has waited
//! [`Config::idle_timeout`](crate::Config::idle_timeout) for its next request. A controller
//! hears thousands of guests, and each connection it keeps costs it a task and buffers (about
//! 20 KiB): a guest holding one open between heartbeats would make 10,000 guests cost hundreds
//! of MiB. Guests drop an idle connection sooner than the channel does
//! ([`far_agent_protocol::limits::CLIENT_IDLE_SECONDS`]), so none sends on one being closed.

use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::Channel;

impl Channel {
    /// Serves [`Channel::router`] on `listener` for as long as the returned future is polled:
    /// once it is dropped, its connections close too (those idle at once, the others when
    /// their request is answered), as they would with the process.
    pub async fn serve(self, listener: TcpListener) {
        let router = self.router();
        let idle = self.shared.config.idle_timeout;
        // Every connection holds a sender; this receiver goes with the future.
        let (serving, _served) = tokio::sync::watch::channel(());
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: connections end, and accepting works again.
                    tracing::warn!(error = %e, "status channel: accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = TowerToHyperService::new(router.clone());
            let serving = serving.clone();
            tokio::spawn(async move {
                let mut http = hyper::server::conn::http1::Builder::new();
                // Hyper times the wait for each request's head, the first and every next one.
                http.timer(TokioTimer::new()).header_read_timeout(idle);
                let connection = http.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                tokio::select! {
                    // However a connection ends, its guest reports again on a new one.
                    _ = connection.as_mut() => return,
                    () = serving.closed() => connection.as_mut().graceful_shutdown(),
                }
                let _ = connection.await;
            });
        }
    }
}
