//! What far-init (PID 1 in every VM) and the agent status channel say to each other.
//!
//! - [`RunConfig`]: the agent's run configuration, served to the guest by the metadata service
//!   under [`RUN_CONFIG_KEY`] (`GET http://169.254.169.254/latest/far-run`), versioned.
//! - The channel: HTTP routes ([`paths`]) carrying [`Heartbeat`], [`LogBatch`] and [`Exit`],
//!   each request authenticated by the agent's own bearer token.
//!
//! Flintlock hosts keep metadata in their records (and answer it to any GetMicroVM), so neither
//! secret values nor the agent's token are in the run configuration. It carries a one-time
//! enrolment token instead, which the guest exchanges for its token ([`paths::ENROL`]) before
//! anything else; once used (or once the agent has reported in) it is worthless. Secret values
//! (env from Secrets, secret files) are fetched once from the channel ([`paths::SECRETS`]) with
//! the token.
//!
//! Every type here is parsed from untrusted bytes on one side or the other: parsing is strict
//! (`deny_unknown_fields`), bounded ([`limits`]) and never panics.

use serde::{Deserialize, Serialize};

/// The metadata key holding the run configuration.
pub const RUN_CONFIG_KEY: &str = "far-run";

/// The run configuration version this build reads and writes.
pub const RUN_CONFIG_VERSION: u32 = 5;

/// Size bounds for everything crossing the channel.
pub mod limits {
    /// Largest run configuration accepted.
    pub const RUN_CONFIG_BYTES: usize = 256 * 1024;
    /// Largest request body the channel accepts.
    pub const REQUEST_BYTES: usize = 256 * 1024;
    /// Most lines in one log batch.
    pub const LOG_LINES_PER_BATCH: usize = 1000;
    /// Longest log line kept; longer lines are cut.
    pub const LOG_LINE_BYTES: usize = 16 * 1024;
    /// Longest failure message kept.
    pub const MESSAGE_BYTES: usize = 1024;
    /// How long the channel holds an idle VM's request for a claim before answering 204.
    pub const CLAIM_WAIT_SECONDS: u64 = 25;
    /// How long a guest keeps trying to enrol while the channel cannot be reached (a controller
    /// restarting, under load, may take that long to serve it again).
    pub const ENROL_SECONDS: u64 = 30;
    /// How long a guest keeps reporting its agent's exit until the channel acknowledges it
    /// (the controller writes it to the FarAgent's status first, which a restarting controller
    /// or a busy API server can delay).
    pub const EXIT_REPORT_SECONDS: u64 = 60;
    /// How long a channel connection may wait for its next request before the channel closes
    /// it. A controller hears thousands of guests: a connection each guest held open between
    /// its reports would cost the controller its buffers and task (tens of KiB) per guest.
    pub const CONNECTION_IDLE_SECONDS: u64 = 5;
    /// How long a guest keeps an idle connection to reuse: well within
    /// [`CONNECTION_IDLE_SECONDS`], so no guest sends on a connection the channel is closing.
    pub const CLIENT_IDLE_SECONDS: u64 = 2;
}

/// An agent's id on the channel: its UID and attempt, so the reports of an earlier run's VM
/// never count for a later run.
pub fn channel_id(uid: &str, attempt: u32) -> String {
    format!("{uid}.{attempt}")
}

/// A [`channel_id`]'s UID and attempt; `None` for an id not of that form.
pub fn parse_channel_id(id: &str) -> Option<(&str, u32)> {
    let (uid, attempt) = id.rsplit_once('.')?;
    Some((uid, attempt.parse().ok()?))
}

/// The channel's routes, relative to the channel URL; `{id}` is the agent's [`channel_id`].
pub mod paths {
    /// POST, with the run configuration's enrolment token as bearer: answers the agent's
    /// [`super::Enrolment`], once.
    pub const ENROL: &str = "/v1/agents/{id}/enrol";
    /// POST a [`super::Heartbeat`]; answers a [`super::HeartbeatReply`].
    pub const HEARTBEAT: &str = "/v1/agents/{id}/heartbeat";
    /// POST a [`super::LogBatch`].
    pub const LOGS: &str = "/v1/agents/{id}/logs";
    /// POST the [`super::Exit`].
    pub const EXIT: &str = "/v1/agents/{id}/exit";
    /// GET the agent's [`super::Secrets`].
    pub const SECRETS: &str = "/v1/agents/{id}/secrets";
    /// GET, by an idle VM (a run configuration without a task): waits up to
    /// [`super::limits::CLAIM_WAIT_SECONDS`] for a [`super::Claim`]; answers 204 No Content when
    /// none came, and the guest asks again.
    pub const CLAIM: &str = "/v1/agents/{id}/claim";

    /// A route for one agent.
    pub fn for_agent(route: &str, id: &str) -> String {
        route.replace("{id}", id)
    }

    /// Whether a guest's request on this route asks the channel to close the connection once
    /// it has answered (`Connection: close`): heartbeats come seconds apart and the exit is
    /// the last report, so a connection kept after them would only cost the controller a task
    /// and buffers (about 20 KiB) until the channel's idle timeout; with 10,000 guests
    /// heartbeating every 10 s, thousands of them at any moment.
    pub fn closes_connection(route: &str) -> bool {
        route == HEARTBEAT || route == EXIT
    }
}

/// Which FarAgent a VM runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentRef {
    /// The FarAgent's namespace.
    pub namespace: String,
    /// The FarAgent's name.
    pub name: String,
    /// The FarAgent's UID.
    pub uid: String,
    /// Which run of the agent this VM is, from 0.
    pub attempt: u32,
}

/// One environment variable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvVar {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

/// A read-only volume for far-init to mount.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Mount {
    /// Position among the VM's additional volumes, from 0 (the root volume is not counted):
    /// the block device order in the guest.
    pub index: u32,
    /// Absolute path inside the VM.
    pub mount_path: String,
}

/// Where and how the agent reports in.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChannelConfig {
    /// Base URL of the status channel, e.g. `http://10.0.2.2:8443`.
    pub url: String,
    /// The agent's id on the channel ([`channel_id`]).
    pub id: String,
    /// The one-time token the guest exchanges for its own at [`paths::ENROL`]. Never logged.
    pub enrolment_token: String,
}

impl std::fmt::Debug for ChannelConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelConfig")
            .field("url", &self.url)
            .field("id", &self.id)
            .field("enrolment_token", &"<redacted>")
            .finish()
    }
}

/// The channel's answer to an enrolment: the bearer token for every other route.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Enrolment {
    /// The agent's token. Never logged.
    pub token: String,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Enrolment { token: <redacted> }")
    }
}

/// Everything far-init needs to boot the VM and, with a task, to run the agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RunConfig {
    /// Always [`RUN_CONFIG_VERSION`] for this shape.
    pub version: u32,
    /// What to run. Unset: the VM is a pool's idle VM, which boots, enrols and waits on the
    /// channel ([`paths::CLAIM`]) for the task of the agent that claims it.
    #[serde(default)]
    pub task: Option<Task>,
    /// Read-only volumes to mount (the VM's, so known before any task).
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// The status channel.
    pub channel: ChannelConfig,
    /// Seconds the agent gets between SIGTERM and SIGKILL.
    pub grace_period_seconds: u32,
    /// A pool's VM with `reuse: Reset`: once a task's exit is acknowledged, far-init kills
    /// every process, wipes every writable path and the secrets, and waits for the next claim
    /// (any doubt, and it powers off instead). Unset: the VM powers off after its one task.
    #[serde(default)]
    pub reusable: bool,
}

/// One run of an agent: which FarAgent, and what to start.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Task {
    /// The agent this run is of.
    pub agent: AgentRef,
    /// Host name to set.
    pub hostname: String,
    /// Absolute path of the program to start.
    pub entrypoint: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its environment (literal values and ConfigMap values; secret values come from the
    /// channel). The agent sees exactly these plus the secret ones.
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Whether secret env or files must be fetched from the channel before starting (a claim
    /// carries its secrets itself).
    #[serde(default)]
    pub has_secrets: bool,
    /// Seconds between heartbeats: the agent's own (`spec.heartbeat.intervalSeconds`), so a
    /// pool's VM, booted before its agent was known, heartbeats as its agent asks.
    pub heartbeat_interval_seconds: u32,
}

/// What an idle VM receives when an agent claims it: the task, and its secret values, in one
/// answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// What to run.
    pub task: Task,
    /// The secret env and files, written before the task starts.
    #[serde(default)]
    pub secrets: Secrets,
    /// The run's own place on the channel: the task heartbeats, ships logs and reports its
    /// exit there, apart from the VM's (so a reused VM's runs never mix).
    pub run: RunGrant,
}

/// A run's id on the channel and the token that opens its routes.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RunGrant {
    /// The run's channel id ([`channel_id`] of the claiming agent's attempt).
    pub id: String,
    /// Its bearer token. Never logged.
    pub token: String,
}

impl std::fmt::Debug for RunGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunGrant")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Why a run configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum RunConfigError {
    /// Larger than [`limits::RUN_CONFIG_BYTES`].
    #[error("run configuration is {0} bytes; at most {max} are accepted", max = limits::RUN_CONFIG_BYTES)]
    TooLarge(usize),
    /// Not the JSON shape of a run configuration.
    #[error("run configuration is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A version this build does not read.
    #[error(
        "run configuration version {0} is not supported (this far-init reads version {RUN_CONFIG_VERSION})"
    )]
    Version(u32),
    /// A field with a value far-init cannot use.
    #[error("run configuration field {field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl RunConfig {
    /// Parses and checks a run configuration from the metadata service.
    ///
    /// # Errors
    /// [`RunConfigError`] naming what is wrong; never panics, whatever the bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, RunConfigError> {
        if bytes.len() > limits::RUN_CONFIG_BYTES {
            return Err(RunConfigError::TooLarge(bytes.len()));
        }
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let Versioned { version } = serde_json::from_slice(bytes)?;
        if version != RUN_CONFIG_VERSION {
            return Err(RunConfigError::Version(version));
        }
        let config: RunConfig = serde_json::from_slice(bytes)?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), RunConfigError> {
        let invalid = |field, problem| Err(RunConfigError::Invalid { field, problem });
        if let Some(task) = &self.task {
            task.check()?;
        }
        if self.channel.id.is_empty() || self.channel.id.contains(['/', '?', '#']) {
            return invalid("channel.id", "must be non-empty, without '/', '?' or '#'");
        }
        if !(self.channel.url.starts_with("http://") || self.channel.url.starts_with("https://")) {
            return invalid("channel.url", "must be an http:// or https:// URL");
        }
        if self
            .mounts
            .iter()
            .any(|m| !m.mount_path.starts_with('/') || m.mount_path.split('/').any(|c| c == ".."))
        {
            return invalid("mounts", "mount paths must be absolute, without '..'");
        }
        Ok(())
    }

    /// Serializes for the metadata service.
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings, numbers and vectors always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Task {
    /// Checks what far-init needs of a task, whether it came in the run configuration or in a
    /// claim.
    ///
    /// # Errors
    /// [`RunConfigError::Invalid`] naming the field (under `task.`).
    pub fn check(&self) -> Result<(), RunConfigError> {
        let invalid = |field, problem| Err(RunConfigError::Invalid { field, problem });
        if !self.entrypoint.starts_with('/') {
            return invalid("task.entrypoint", "must be an absolute path");
        }
        if self.agent.uid.is_empty() {
            return invalid("task.agent.uid", "must not be empty");
        }
        if self.heartbeat_interval_seconds == 0 {
            return invalid("task.heartbeatIntervalSeconds", "must be at least 1");
        }
        if self
            .env
            .iter()
            .any(|e| e.name.is_empty() || e.name.contains('=') || e.name.contains('\0'))
        {
            return invalid("task.env", "names must be non-empty, without '=' or NUL");
        }
        Ok(())
    }
}

/// What the guest is doing, sent every heartbeat interval.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Heartbeat {
    /// Milliseconds from kernel start to the entrypoint's start (set once the agent runs).
    #[serde(default)]
    pub boot_to_entrypoint_ms: Option<u64>,
    /// Guest memory in use, bytes.
    #[serde(default)]
    pub memory_used_bytes: u64,
    /// Guest memory in total, bytes.
    #[serde(default)]
    pub memory_total_bytes: u64,
    /// CPU seconds the guest has used, in milliseconds.
    #[serde(default)]
    pub cpu_used_ms: u64,
}

/// The channel's answer to a heartbeat.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatReply {
    /// Stop the agent: SIGTERM, the grace period, SIGKILL, then report the exit as usual (the
    /// FarAgent is being deleted).
    pub stop: bool,
}

/// Which output stream a log line came from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The agent's stdout.
    Stdout,
    /// The agent's stderr.
    Stderr,
}

/// One line the agent printed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogLine {
    /// Which stream.
    pub stream: Stream,
    /// The text, without the newline.
    pub text: String,
}

/// Lines in order; `seq` numbers batches from 0 so a retried batch is not kept twice.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogBatch {
    /// The batch's number, from 0, one more each batch.
    pub seq: u64,
    /// The lines.
    pub lines: Vec<LogLine>,
}

/// How the agent ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Exit {
    /// The agent's exit code; for a signal, 128 + the signal number, as shells report it.
    pub code: i32,
    /// Set when the agent could not be started at all (missing entrypoint, bad configuration):
    /// far-init's reason, for status.
    #[serde(default)]
    pub start_error: Option<String>,
}

/// The agent's secret values, fetched once from the channel.
#[derive(Serialize, Deserialize, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// Environment variables from Secrets.
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Files: absolute path and content (base64 in JSON).
    #[serde(default)]
    pub files: Vec<SecretFile>,
}

impl Secrets {
    /// Whether there is nothing to hand the guest (its run configuration then says so, and
    /// far-init does not ask).
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.files.is_empty()
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("env", &self.env.iter().map(|e| &e.name).collect::<Vec<_>>())
            .field(
                "files",
                &self.files.iter().map(|e| &e.path).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// One secret file.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretFile {
    /// Absolute path inside the VM.
    pub path: String,
    /// Content, base64.
    pub content: String,
}

#[cfg(test)]
mod tests;
