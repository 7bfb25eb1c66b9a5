//! The metadata service, read the way a Firecracker guest reads MMDS: a plain V1 GET first (the
//! version flintlockd configures, and far-host's), the V2 session-token flow when the service
//! demands a token (401).

use std::time::{Duration, Instant};

use far_agent_protocol::limits;

use crate::http::{self, Client, Request, Response};

/// Why the metadata could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The service never answered within the wait.
    #[error("no answer from {url} within {waited:?}: {last}")]
    Unreachable {
        /// What was asked.
        url: String,
        /// How long we tried.
        waited: Duration,
        /// The last error seen.
        last: String,
    },
    /// The service answered with an error status.
    #[error("{url} answered {status}")]
    Status {
        /// What was asked.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The service's answer is larger than a run configuration may be.
    #[error("{url}: {source}")]
    TooLarge {
        /// What was asked.
        url: String,
        /// The bound.
        #[source]
        source: http::Error,
    },
}

/// A metadata service client.
pub struct Metadata {
    base: String,
    http: Client,
}

/// Seconds a V2 session token is asked to live.
const TOKEN_TTL_SECONDS: &str = "21600";

impl Metadata {
    /// A client for the service at `base` (e.g. `http://169.254.169.254`).
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            http: Client::new(
                Duration::from_secs(2),
                Duration::from_secs(limits::CLIENT_IDLE_SECONDS),
                limits::RUN_CONFIG_BYTES,
            ),
        }
    }

    /// A V2 session token, or `None` when the service has no token endpoint.
    fn token(&self) -> Result<Option<String>, http::Error> {
        let url = format!("{}/latest/api/token", self.base);
        let response = self.http.send(
            &Request::put(&url, &[]).header("X-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS),
        )?;
        if !(200..300).contains(&response.status) {
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(&response.body).trim().to_owned(),
        ))
    }

    fn get(&self, url: &str, token: Option<&str>) -> Result<Response, http::Error> {
        let mut request = Request::get(url);
        if let Some(token) = token {
            request = request.header("X-metadata-token", token);
        }
        self.http.send(&request)
    }

    fn fetch_once(&self, key: &str) -> Result<Vec<u8>, FetchError> {
        let url = format!("{}/latest/{key}", self.base);
        let transport = |e: http::Error| match e {
            http::Error::TooLarge { .. } => FetchError::Final(MetadataError::TooLarge {
                url: url.clone(),
                source: e,
            }),
            e => FetchError::Transport(e),
        };
        // V1 first: one request where the service allows it, which costs boot time under
        // software emulation; a V2-only service answers 401 and gets the token flow.
        let mut response = self.get(&url, None).map_err(transport)?;
        if response.status == 401
            && let Some(token) = self.token().map_err(transport)?
        {
            response = self.get(&url, Some(&token)).map_err(transport)?;
        }
        if response.status != 200 {
            return Err(FetchError::Final(MetadataError::Status {
                url,
                status: response.status,
            }));
        }
        Ok(response.body)
    }

    /// Reads one key, retrying while the service is unreachable (the network may still be
    /// coming up) for at most `wait`.
    ///
    /// # Errors
    /// [`MetadataError`] when the key is missing or the service never answered.
    pub fn fetch(&self, key: &str, wait: Duration) -> Result<Vec<u8>, MetadataError> {
        let started = Instant::now();
        loop {
            match self.fetch_once(key) {
                Ok(bytes) => return Ok(bytes),
                Err(FetchError::Final(e)) => return Err(e),
                Err(FetchError::Transport(e)) if started.elapsed() >= wait => {
                    return Err(MetadataError::Unreachable {
                        url: format!("{}/latest/{key}", self.base),
                        waited: wait,
                        last: e.to_string(),
                    });
                }
                Err(FetchError::Transport(_)) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

enum FetchError {
    /// Worth asking again while the wait lasts.
    Transport(http::Error),
    /// An answer, and not the key's value.
    Final(MetadataError),
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A tiny HTTP server answering from a function, recording each request's first line and
    /// token header.
    fn serve(answer: fn(&str, Option<&str>) -> (u16, String)) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                let (mut token, mut length) = (None, 0usize);
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap();
                    match name.to_ascii_lowercase().as_str() {
                        "x-metadata-token" => token = Some(value.trim().to_owned()),
                        "content-length" => length = value.trim().parse().unwrap(),
                        _ => {}
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let request = first.trim().to_owned();
                log.lock().unwrap().push(format!(
                    "{request} token={}",
                    token.as_deref().unwrap_or("-")
                ));
                let (status, text) = answer(&request, token.as_deref());
                let reply = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
                stream.write_all(reply.as_bytes()).unwrap();
            }
        });
        (base, seen)
    }

    #[test]
    fn a_v1_service_is_read_with_one_request() {
        let (base, seen) = serve(|request, _| match request {
            r if r.starts_with("GET /latest/far-run") => (200, "cfg".into()),
            _ => (404, String::new()),
        });
        assert_eq!(
            Metadata::new(&base)
                .fetch("far-run", Duration::from_secs(2))
                .unwrap(),
            b"cfg"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            ["GET /latest/far-run HTTP/1.1 token=-"]
        );
    }

    #[test]
    fn a_service_demanding_a_token_gets_the_v2_token_flow() {
        let (base, seen) = serve(|request, token| match (request, token) {
            (r, _) if r.starts_with("PUT /latest/api/token") => (200, "T0K".into()),
            (r, Some("T0K")) if r.starts_with("GET /latest/far-run") => {
                (200, "{\"version\":1}".into())
            }
            _ => (401, String::new()),
        });
        let bytes = Metadata::new(&base)
            .fetch("far-run", Duration::from_secs(2))
            .unwrap();
        assert_eq!(bytes, b"{\"version\":1}");
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "GET /latest/far-run HTTP/1.1 token=-",
                "PUT /latest/api/token HTTP/1.1 token=-",
                "GET /latest/far-run HTTP/1.1 token=T0K",
            ]
        );
    }

    #[test]
    fn a_refusal_without_a_token_endpoint_is_an_error() {
        let (base, _) = serve(|request, _| match request {
            r if r.starts_with("PUT") => (405, String::new()),
            _ => (401, String::new()),
        });
        let err = Metadata::new(&base)
            .fetch("far-run", Duration::from_secs(2))
            .unwrap_err();
        assert!(
            matches!(err, MetadataError::Status { status: 401, .. }),
            "{err}"
        );
    }

    #[test]
    fn an_answer_larger_than_a_run_configuration_is_an_error_at_once() {
        let (base, seen) = serve(|_, _| (200, "x".repeat(limits::RUN_CONFIG_BYTES + 1)));
        let err = Metadata::new(&base)
            .fetch("far-run", Duration::from_secs(5))
            .unwrap_err();
        assert!(
            err.to_string().ends_with(&format!(
                "is larger than {} bytes",
                limits::RUN_CONFIG_BYTES
            )),
            "{err}"
        );
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_missing_key_is_an_error_at_once_and_an_absent_service_after_the_wait() {
        let (base, _) = serve(|_, _| (404, String::new()));
        let err = Metadata::new(&base)
            .fetch("far-run", Duration::from_secs(5))
            .unwrap_err();
        assert!(
            matches!(err, MetadataError::Status { status: 404, .. }),
            "{err}"
        );

        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = Metadata::new(&format!("http://{closed}"))
            .fetch("far-run", Duration::from_millis(300))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("no answer from http://{closed}/latest/far-run")),
            "{err}"
        );
    }
}
