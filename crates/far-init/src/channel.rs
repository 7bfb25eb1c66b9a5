//! The agent status channel, from the guest's side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use far_agent_protocol::{
    Claim, Enrolment, Exit, Heartbeat, HeartbeatReply, RunConfig, RunGrant, Secrets, limits, paths,
};
use serde::Serialize;

use crate::http::{self, Client, Request, Response};
use crate::say;

/// Why a channel call failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The channel could not be reached.
    #[error("{route}: {source}")]
    Transport {
        /// The route.
        route: String,
        /// The cause.
        #[source]
        source: http::Error,
    },
    /// The channel refused the request.
    #[error("{route}: answered {status}")]
    Refused {
        /// The route.
        route: String,
        /// The HTTP status.
        status: u16,
    },
    /// The answer was not what the protocol says.
    #[error("{route}: malformed answer: {detail}")]
    Malformed {
        /// The route.
        route: String,
        /// What was wrong.
        detail: String,
    },
}

/// A client of the status channel for one agent.
pub struct Channel {
    base: String,
    id: String,
    authorization: String,
    http: Arc<Client>,
}

impl Channel {
    /// Enrols with the channel named in the run configuration: exchanges the one-time
    /// enrolment token for the agent's own, retrying while the channel cannot be reached or
    /// answers 5xx, for at most `within`.
    ///
    /// # Errors
    /// [`ChannelError`]: unreachable within the time, or refused (409: this run has enrolled
    /// already, so someone else may have used the token from the VM's metadata).
    pub fn enrol(config: &RunConfig, within: Duration) -> Result<Self, ChannelError> {
        let mut channel = Self {
            base: config.channel.url.trim_end_matches('/').to_owned(),
            id: config.channel.id.clone(),
            authorization: format!("Bearer {}", config.channel.enrolment_token),
            // A connection is kept between reports only as long as the channel would keep it
            // (log batches come back to back); heartbeats close theirs
            // ([`paths::closes_connection`]).
            http: Arc::new(Client::new(
                Duration::from_secs(5),
                Duration::from_secs(limits::CLIENT_IDLE_SECONDS),
                limits::REQUEST_BYTES,
            )),
        };
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        let enrolment: Enrolment = loop {
            match channel.call(paths::ENROL, Some(&[])) {
                Ok(enrolment) => break enrolment,
                Err(ChannelError::Refused { status, .. }) if status < 500 => {
                    return Err(channel.refused(paths::ENROL, status));
                }
                Err(e) if started.elapsed() >= within => return Err(e),
                Err(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        channel.authorization = format!("Bearer {}", enrolment.token);
        Ok(channel)
    }

    /// The same channel, for the claimed run `grant` names: its task's reports go there.
    pub fn for_run(&self, grant: &RunGrant) -> Self {
        Self {
            base: self.base.clone(),
            id: grant.id.clone(),
            authorization: format!("Bearer {}", grant.token),
            http: Arc::clone(&self.http),
        }
    }

    fn refused(&self, route: &str, status: u16) -> ChannelError {
        ChannelError::Refused {
            route: route.to_owned(),
            status,
        }
    }

    fn url(&self, route: &str) -> String {
        format!("{}{}", self.base, paths::for_agent(route, &self.id))
    }

    /// POSTs one message.
    ///
    /// # Errors
    /// [`ChannelError`] when unreachable or refused.
    pub fn post<T: Serialize>(&self, route: &str, body: &T) -> Result<(), ChannelError> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let status = self.send(route, Some(&bytes), None)?.status;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(self.refused(route, status))
        }
    }

    /// A GET, or a POST of a JSON `body`, with the agent's authorization.
    fn send(
        &self,
        route: &str,
        body: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<Response, ChannelError> {
        let url = self.url(route);
        let mut request = match body {
            Some(body) => Request::post(&url, body).header("Content-Type", "application/json"),
            None => Request::get(&url),
        }
        .header("Authorization", &self.authorization);
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        if paths::closes_connection(route) {
            request = request.close();
        }
        self.http
            .send(&request)
            .map_err(|source| ChannelError::Transport {
                route: route.to_owned(),
                source,
            })
    }

    /// Sends a heartbeat; the answer says whether to stop the agent.
    ///
    /// # Errors
    /// [`ChannelError`] when unreachable, refused or malformed.
    pub fn heartbeat(&self, beat: &Heartbeat) -> Result<HeartbeatReply, ChannelError> {
        let body = serde_json::to_vec(beat).unwrap_or_default();
        self.call(paths::HEARTBEAT, Some(&body))
    }

    /// Fetches the agent's secret values.
    ///
    /// # Errors
    /// [`ChannelError`] when unreachable, refused or malformed.
    pub fn secrets(&self) -> Result<Secrets, ChannelError> {
        self.call(paths::SECRETS, None)
    }

    /// Waits, as a pool's idle VM, for an agent to claim it: asks the channel, which holds the
    /// request until a claim comes or answers "none yet" (204), and asks again. An unreachable
    /// channel is asked again after a pause: an idle VM waits until it is claimed or destroyed.
    ///
    /// # Errors
    /// [`ChannelError`] when the channel refuses (4xx) or answers something else than a claim.
    pub fn wait_for_claim(&self) -> Result<Claim, ChannelError> {
        let route = paths::CLAIM;
        let mut delay = Duration::from_millis(100);
        loop {
            let wait = Duration::from_secs(limits::CLAIM_WAIT_SECONDS + 10);
            let response = match self.send(route, None, Some(wait)) {
                Ok(response) => response,
                Err(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            match response.status {
                200 => return self.parse(route, &response.body),
                204 => delay = Duration::from_millis(100),
                status if (400..500).contains(&status) && status != 429 => {
                    return Err(self.refused(route, status));
                }
                _ => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// A GET, or a POST of `body`, whose JSON answer is read within the channel's size bound.
    fn call<T: serde::de::DeserializeOwned>(
        &self,
        route: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ChannelError> {
        let response = self.send(route, body, None)?;
        if response.status != 200 {
            return Err(self.refused(route, response.status));
        }
        self.parse(route, &response.body)
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        route: &str,
        body: &[u8],
    ) -> Result<T, ChannelError> {
        serde_json::from_slice(body).map_err(|e| ChannelError::Malformed {
            route: route.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Reports the exit, retrying until acknowledged or `within` has passed; whether it was
    /// acknowledged.
    pub fn report_exit(&self, exit: &Exit, within: Duration) -> bool {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.post(paths::EXIT, exit) {
                Ok(()) => return true,
                Err(ChannelError::Refused { status, .. })
                    if (400..500).contains(&status) && status != 429 =>
                {
                    say!("exit report refused ({status}); not retrying");
                    return false;
                }
                Err(e) if started.elapsed() >= within => {
                    say!("exit report never acknowledged: {e}");
                    return false;
                }
                Err(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
