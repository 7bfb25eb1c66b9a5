//! The agent status channel, from the guest's side.

use std::time::{Duration, Instant};

use far_agent_protocol::{
    Claim, Enrolment, Exit, Heartbeat, HeartbeatReply, RunConfig, RunGrant, Secrets, limits, paths,
};
use serde::Serialize;
use ureq::Agent;

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
        source: ureq::Error,
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
    agent: Agent,
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
            agent: Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(5)))
                // A connection is kept between reports only as long as the channel would keep
                // it: heartbeats, seconds apart, each open their own.
                .max_idle_age(Duration::from_secs(limits::CLIENT_IDLE_SECONDS))
                .http_status_as_error(false)
                .build()
                .into(),
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
            agent: self.agent.clone(),
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
        let response = self
            .agent
            .post(self.url(route))
            .header("Authorization", &self.authorization)
            .header("Content-Type", "application/json")
            .send(&bytes[..])
            .map_err(|source| ChannelError::Transport {
                route: route.to_owned(),
                source,
            })?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(self.refused(route, status))
        }
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
            let sent = self
                .agent
                .get(self.url(route))
                .header("Authorization", &self.authorization)
                .config()
                .timeout_global(Some(Duration::from_secs(limits::CLAIM_WAIT_SECONDS + 10)))
                .build()
                .call();
            let mut response = match sent {
                Ok(response) => response,
                Err(_) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            match response.status().as_u16() {
                200 => {
                    let body = response
                        .body_mut()
                        .with_config()
                        .limit(limits::REQUEST_BYTES as u64)
                        .read_to_vec()
                        .map_err(|source| ChannelError::Transport {
                            route: route.to_owned(),
                            source,
                        })?;
                    return serde_json::from_slice(&body).map_err(|e| ChannelError::Malformed {
                        route: route.to_owned(),
                        detail: e.to_string(),
                    });
                }
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
        let transport = |source| ChannelError::Transport {
            route: route.to_owned(),
            source,
        };
        let url = self.url(route);
        let mut response = match body {
            Some(body) => self
                .agent
                .post(url)
                .header("Authorization", &self.authorization)
                .header("Content-Type", "application/json")
                .send(body),
            None => self
                .agent
                .get(url)
                .header("Authorization", &self.authorization)
                .call(),
        }
        .map_err(transport)?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(self.refused(route, status));
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(limits::REQUEST_BYTES as u64)
            .read_to_vec()
            .map_err(transport)?;
        serde_json::from_slice(&body).map_err(|e| ChannelError::Malformed {
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
