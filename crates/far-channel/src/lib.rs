//! The agent status channel: what far-init tells FAR about the agent it runs.
//!
//! HTTP routes ([`far_agent_protocol::paths`]) for heartbeats, log batches, the exit code, the
//! one-time fetch of secret values, and an idle VM's wait for the claim that gives it its task. Every request carries the agent's own bearer token, an HMAC
//! of its UID ([`token`]): a token opens only its own agent's routes. Bodies are bounded, each
//! agent's request rate is bounded, each agent's log buffer is bounded.
//!
//! The channel keeps what it hears in memory and tells its owner through [`Event`]s: the
//! controller turns them into status (writing the API server only when state changes), and
//! `far run` into terminal output.

mod serve;
pub mod token;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use far_agent_protocol::{
    Claim, Enrolment, Exit, Heartbeat, HeartbeatReply, LogBatch, LogLine, Secrets, limits,
};
use tokio::sync::broadcast;
use tokio::time::Instant;

pub use token::TokenKey;

/// Settings of the channel.
#[derive(Clone)]
pub struct Config {
    /// The key agents' tokens are derived from.
    pub key: TokenKey,
    /// Log lines kept per agent (the newest).
    pub log_lines_per_agent: usize,
    /// Bytes of log text kept per agent (the newest lines): with the line count, what bounds
    /// the channel's memory per agent, as a line may be up to 16 KiB.
    pub log_bytes_per_agent: usize,
    /// Requests one agent may make per second before being answered 429.
    pub requests_per_second: u32,
    /// Exits are acknowledged only once made durable by the hook [`Channel::persist_exits`]
    /// installs; until it is installed (a controller serves its channel before it leads), they
    /// are answered 503 and the guest reports again. The controller sets this; `far run`,
    /// with nothing to persist to, does not.
    pub durable_exits: bool,
    /// How long [`Channel::serve`] keeps a connection waiting for its next request.
    pub idle_timeout: Duration,
}

/// An exit to make durable: which FarAgent, which run, how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// The FarAgent's namespace and name, when this process has named the run
    /// ([`Channel::name`]); a controller just started may not have yet, and finds the agent by
    /// the UID in `id`.
    pub agent: Option<(String, String)>,
    /// The run's channel id (`<uid>.<attempt>`).
    pub id: String,
    /// How it ended.
    pub exit: Exit,
}

/// See [`Channel::persist_exits`].
pub type PersistExit = Arc<
    dyn Fn(
            ExitReport,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("log_lines_per_agent", &self.log_lines_per_agent)
            .field("log_bytes_per_agent", &self.log_bytes_per_agent)
            .field("requests_per_second", &self.requests_per_second)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// Defaults: the newest 1000 log lines within 64 KiB, and 50 requests per second, per agent;
    /// idle connections closed after [`limits::CONNECTION_IDLE_SECONDS`].
    pub fn new(key: TokenKey) -> Self {
        Self {
            key,
            log_lines_per_agent: 1000,
            log_bytes_per_agent: 64 * 1024,
            requests_per_second: 50,
            durable_exits: false,
            idle_timeout: Duration::from_secs(limits::CONNECTION_IDLE_SECONDS),
        }
    }
}

/// What an agent said, as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A heartbeat; `first` for the agent's first since the channel started.
    Heartbeat {
        /// The agent's UID.
        uid: String,
        /// Whether this is the first heartbeat heard from it.
        first: bool,
        /// What it reported.
        heartbeat: Heartbeat,
    },
    /// New log lines (a retried batch is not repeated).
    Logs {
        /// The agent's UID.
        uid: String,
        /// The lines, in order.
        lines: Vec<LogLine>,
    },
    /// A pool's idle VM is booted, enrolled and waiting for a claim (said once each time it
    /// starts waiting: after its boot, and again after each reset for reuse).
    Idle {
        /// The VM's channel id.
        uid: String,
    },
    /// The agent exited (said once, however often far-init retries).
    Exited {
        /// The agent's UID.
        uid: String,
        /// How.
        exit: Exit,
    },
}

/// What the channel knows of one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentView {
    /// Time since the last heartbeat, if any was heard.
    pub since_heartbeat: Option<Duration>,
    /// The last heartbeat's figures.
    pub heartbeat: Option<Heartbeat>,
    /// The exit, once reported.
    pub exit: Option<Exit>,
    /// A pool's idle VM waiting for a claim, none offered yet.
    pub idle: bool,
}

/// One agent's state. Kept small: a controller holds one per agent it runs (10,000 and more),
/// so what only some agents need (secret values until fetched, a pool VM's claim and its
/// waiters) is boxed, not carried inline by every agent.
#[derive(Default)]
struct Agent {
    last_heartbeat: Option<(Instant, Heartbeat)>,
    logs: VecDeque<LogLine>,
    /// The text bytes in `logs`.
    log_bytes: usize,
    next_seq: u64,
    exit: Option<Exit>,
    secrets: Option<Box<Secrets>>,
    window: Option<(Instant, u32)>,
    /// The enrolment token is spent: the agent's token was handed out, or the agent has been
    /// heard with it.
    enrolled: bool,
    /// The next heartbeat is answered "stop".
    stop: bool,
    /// An idle VM has asked for a claim.
    idle: bool,
    /// The claim offered to this idle VM: answered to every request for one until the task
    /// reports in on its run's id (an answer lost on the way is answered again).
    claim: Option<Box<Claim>>,
    /// For a claimed run: the channel id of the VM it was offered to, until the run reports in.
    offered_to: Option<String>,
    /// `namespace/name` of the FarAgent this run is of ([`Channel::name`]).
    name: Option<Box<str>>,
    /// Wakes this VM's requests waiting for a claim (made by its first wait).
    offered: Option<Arc<tokio::sync::Notify>>,
}

/// Which token a route takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Credential {
    /// The agent's own token: every route but enrolment.
    Agent,
    /// The run configuration's one-time enrolment token.
    Enrolment,
}

struct Shared {
    config: Config,
    agents: Mutex<HashMap<String, Box<Agent>>>,
    events: broadcast::Sender<Event>,
    persist: std::sync::OnceLock<PersistExit>,
}

/// The status channel. Cheap to clone.
#[derive(Clone)]
pub struct Channel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").finish_non_exhaustive()
    }
}

/// Why a request was refused; each maps to one status code.
#[derive(Debug)]
enum Refusal {
    Unauthorized,
    TooMany,
    Malformed(String),
    Body(StatusCode, String),
    NotFound,
    Unavailable,
    Enrolled,
}

impl axum::response::IntoResponse for Refusal {
    fn into_response(self) -> axum::response::Response {
        match self {
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "this token does not belong to this agent".to_owned(),
            ),
            Refusal::TooMany => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests from this agent".to_owned(),
            ),
            Refusal::Malformed(why) => (StatusCode::BAD_REQUEST, why),
            Refusal::Body(status, why) => (status, why),
            Refusal::NotFound => (
                StatusCode::NOT_FOUND,
                "nothing here for this agent".to_owned(),
            ),
            Refusal::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not recorded yet; report again".to_owned(),
            ),
            Refusal::Enrolled => (
                StatusCode::CONFLICT,
                "this agent has enrolled already: its enrolment token is spent".to_owned(),
            ),
        }
        .into_response()
    }
}

fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T, Refusal> {
    // The rejection knows its status: 413 for an oversized body, 400/415/422 for bad ones.
    parsed
        .map(|Json(v)| v)
        .map_err(|e| Refusal::Body(e.status(), e.body_text()))
}

impl Channel {
    /// A channel with these settings.
    pub fn new(config: Config) -> Self {
        let (events, _) = broadcast::channel(16_384);
        Self {
            shared: Arc::new(Shared {
                config,
                agents: Mutex::default(),
                events,
                persist: std::sync::OnceLock::new(),
            }),
        }
    }

    fn agents(&self) -> MutexGuard<'_, HashMap<String, Box<Agent>>> {
        self.shared.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The HTTP routes, to serve on their own or nest in a larger server.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/agents/{uid}/enrol", post(enrol))
            .route("/v1/agents/{uid}/heartbeat", post(heartbeat))
            .route("/v1/agents/{uid}/logs", post(logs))
            .route("/v1/agents/{uid}/exit", post(exit))
            .route("/v1/agents/{uid}/secrets", get(secrets))
            .route("/v1/agents/{uid}/claim", get(claim))
            .layer(DefaultBodyLimit::max(limits::REQUEST_BYTES))
            .with_state(self.clone())
    }

    /// Everything agents say from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The agent's own token (what enrolment answers).
    pub fn token_for(&self, uid: &str) -> String {
        self.shared.config.key.token_for(uid)
    }

    /// The one-time enrolment token for the run configuration of the agent with this UID.
    pub fn enrolment_token_for(&self, uid: &str) -> String {
        self.shared.config.key.enrolment_token_for(uid)
    }

    /// Asks a guest that reports in to stop its agent: its next heartbeat is answered so (far-init
    /// then sends SIGTERM, waits the grace period, and reports the exit).
    pub fn request_stop(&self, uid: &str) {
        if let Some(agent) = self.agents().get_mut(uid) {
            agent.stop = true;
        }
    }

    /// Spends an agent's enrolment token without enrolling: for a run known to have reported
    /// in already (its status says so), whose enrolment this process did not see.
    pub fn close_enrolment(&self, uid: &str) {
        self.agents().entry(uid.to_owned()).or_default().enrolled = true;
    }

    /// Holds an agent's secret values until its far-init fetches them, once.
    pub fn provide_secrets(&self, uid: &str, secrets: Secrets) {
        self.agents().entry(uid.to_owned()).or_default().secrets = Some(Box::new(secrets));
    }

    /// Gives the idle VM with channel id `uid` its task: its wait for a claim is answered with
    /// `claim` at once (or at its next request), and again should it ask again before the
    /// task's first heartbeat.
    pub fn offer_claim(&self, uid: &str, claim: Claim) {
        let mut agents = self.agents();
        // The run's token travels in the claim: no enrolment token ever opens its routes.
        let run = agents.entry(claim.run.id.clone()).or_default();
        run.enrolled = true;
        run.offered_to = Some(uid.to_owned());
        let vm = agents.entry(uid.to_owned()).or_default();
        vm.claim = Some(Box::new(claim));
        if let Some(offered) = &vm.offered {
            offered.notify_waiters();
        }
    }

    /// A claimed run reported in: its VM's claim (and the secret values in it) is not needed
    /// again, and the VM is no longer idle (a reused VM says so again when it next waits).
    fn claim_arrived(&self, vm: Option<String>) {
        if let Some(vm) = vm
            && let Some(vm) = self.agents().get_mut(&vm)
        {
            vm.claim = None;
            vm.idle = false;
        }
    }

    /// What is known of an agent.
    pub fn view(&self, uid: &str) -> Option<AgentView> {
        self.agents().get(uid).map(|a| AgentView {
            since_heartbeat: a.last_heartbeat.map(|(at, _)| at.elapsed()),
            heartbeat: a.last_heartbeat.map(|(_, h)| h),
            exit: a.exit.clone(),
            idle: a.idle && a.claim.is_none(),
        })
    }

    /// The agent's newest log lines (apart from [`Channel::view`], which every reconcile reads:
    /// up to `log_lines_per_agent` lines are copied here).
    pub fn logs(&self, uid: &str) -> Option<Vec<LogLine>> {
        self.agents()
            .get(uid)
            .map(|a| a.logs.iter().cloned().collect())
    }

    /// Drops everything about an agent (it is gone).
    pub fn forget(&self, uid: &str) {
        self.agents().remove(uid);
    }

    /// Makes every exit durable before it is acknowledged: `persist` (the controller writes the
    /// exit code to the FarAgent's status) must succeed first, else the guest is answered 503
    /// and reports again. An exit is then never acknowledged and lost with the process. The
    /// first hook set stays.
    pub fn persist_exits(&self, persist: PersistExit) {
        let _ = self.shared.persist.set(persist);
    }

    /// Records that the run with channel id `id` is of the FarAgent `namespace/name`, for
    /// [`Channel::named`], exit reports and [`Channel::logs_router`].
    pub fn name(&self, namespace: &str, name: &str, id: &str) {
        let mut agents = self.agents();
        let agent = match agents.get_mut(id) {
            Some(agent) => agent,
            None => agents.entry(id.to_owned()).or_default(),
        };
        if split(agent.name.as_deref()) != Some((namespace, name)) {
            agent.name = Some(format!("{namespace}/{name}").into());
        }
    }

    /// The namespace and name of the FarAgent whose run has channel id `id`, if it was named.
    pub fn named(&self, id: &str) -> Option<(String, String)> {
        let agents = self.agents();
        let (namespace, name) = split(agents.get(id)?.name.as_deref())?;
        Some((namespace.to_owned(), name.to_owned()))
    }

    /// The channel id of the FarAgent `namespace/name`'s latest run this channel knows of
    /// (users read logs rarely: a scan, not an index every agent would pay for).
    fn run_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.agents()
            .iter()
            .filter(|(_, agent)| split(agent.name.as_deref()) == Some((namespace, name)))
            .max_by_key(|(id, _)| far_agent_protocol::parse_channel_id(id).map(|(_, n)| n))
            .map(|(id, _)| id.clone())
    }

    /// The log routes for users: `GET /v1/namespaces/{namespace}/faragents/{name}/logs`
    /// (`?follow=true` streams new lines until the agent exits). They carry no authentication
    /// of their own: serve them only inside the cluster, behind the API server's service proxy,
    /// so Kubernetes RBAC decides who reads which agent's output.
    pub fn logs_router(&self) -> Router {
        Router::new()
            .route(
                "/v1/namespaces/{namespace}/faragents/{name}/logs",
                get(read_logs),
            )
            .with_state(self.clone())
    }

    /// Authenticates and rate-limits one request, then applies `change` to the agent's state.
    fn with_agent<T>(
        &self,
        uid: &str,
        headers: &HeaderMap,
        credential: Credential,
        change: impl FnOnce(&mut Agent) -> T,
    ) -> Result<T, Refusal> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Refusal::Unauthorized)?;
        let key = &self.shared.config.key;
        let valid = match credential {
            Credential::Agent => key.verify(uid, token),
            Credential::Enrolment => key.verify_enrolment(uid, token),
        };
        if !valid {
            tracing::debug!(agent = %uid, "channel request with a foreign or bad token");
            return Err(Refusal::Unauthorized);
        }
        let mut agents = self.agents();
        let agent = agents.entry(uid.to_owned()).or_default();
        if credential == Credential::Agent {
            agent.enrolled = true;
        }
        let now = Instant::now();
        match &mut agent.window {
            Some((start, count)) if now.duration_since(*start) < Duration::from_secs(1) => {
                *count += 1;
                if *count > self.shared.config.requests_per_second {
                    return Err(Refusal::TooMany);
                }
            }
            window => *window = Some((now, 1)),
        }
        Ok(change(agent))
    }

    fn emit(&self, event: Event) {
        // No subscriber is fine: the state is kept either way.
        let _ = self.shared.events.send(event);
    }
}

async fn enrol(
    State(channel): State<Channel>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Enrolment>, Refusal> {
    let first = channel.with_agent(&uid, &headers, Credential::Enrolment, |a| {
        !std::mem::replace(&mut a.enrolled, true)
    })?;
    if !first {
        // Either far-init retried after a lost answer, or someone else read the enrolment
        // token from the VM's metadata: the guest, refused, stops and says why.
        tracing::warn!(agent = %uid, "enrolment refused: this run has enrolled already");
        return Err(Refusal::Enrolled);
    }
    Ok(Json(Enrolment {
        token: channel.token_for(&uid),
    }))
}

async fn heartbeat(
    State(channel): State<Channel>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    parsed: Result<Json<Heartbeat>, JsonRejection>,
) -> Result<Json<HeartbeatReply>, Refusal> {
    let beat = body(parsed)?;
    let (first, stop, vm) = channel.with_agent(&uid, &headers, Credential::Agent, |a| {
        (
            a.last_heartbeat.replace((Instant::now(), beat)).is_none(),
            a.stop,
            a.offered_to.take(),
        )
    })?;
    channel.claim_arrived(vm);
    channel.emit(Event::Heartbeat {
        uid,
        first,
        heartbeat: beat,
    });
    Ok(Json(HeartbeatReply { stop }))
}

async fn logs(
    State(channel): State<Channel>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    parsed: Result<Json<LogBatch>, JsonRejection>,
) -> Result<StatusCode, Refusal> {
    let batch = body(parsed)?;
    if batch.lines.len() > limits::LOG_LINES_PER_BATCH {
        return Err(Refusal::Malformed(format!(
            "at most {} lines per batch",
            limits::LOG_LINES_PER_BATCH
        )));
    }
    let config = &channel.shared.config;
    let (keep_lines, keep_bytes) = (config.log_lines_per_agent, config.log_bytes_per_agent);
    let lines = channel.with_agent(&uid, &headers, Credential::Agent, |a| {
        if batch.seq < a.next_seq {
            return None; // A retry of a batch already kept.
        }
        a.next_seq = batch.seq + 1;
        let mut lines = batch.lines;
        for line in &mut lines {
            if line.text.len() > limits::LOG_LINE_BYTES {
                let mut cut = limits::LOG_LINE_BYTES;
                while !line.text.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.text.truncate(cut);
            }
            a.log_bytes += line.text.len();
            a.logs.push_back(line.clone());
        }
        while a.logs.len() > keep_lines || a.log_bytes > keep_bytes {
            let Some(oldest) = a.logs.pop_front() else {
                break;
            };
            a.log_bytes -= oldest.text.len();
        }
        Some(lines)
    })?;
    if let Some(lines) = lines {
        for line in &lines {
            tracing::info!(target: "far_agent", agent = %uid, stream = ?line.stream, "{}", line.text);
        }
        channel.emit(Event::Logs { uid, lines });
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn exit(
    State(channel): State<Channel>,
    Path(uid): Path<String>,
    headers: HeaderMap,
    parsed: Result<Json<Exit>, JsonRejection>,
) -> Result<StatusCode, Refusal> {
    let mut exit = body(parsed)?;
    if let Some(reason) = &mut exit.start_error
        && reason.len() > limits::MESSAGE_BYTES
    {
        let mut cut = limits::MESSAGE_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let known = channel.with_agent(&uid, &headers, Credential::Agent, |a| a.exit.is_some())?;
    if known {
        return Ok(StatusCode::NO_CONTENT);
    }
    let persist = channel.shared.persist.get();
    if persist.is_none() && channel.shared.config.durable_exits {
        tracing::debug!(agent = %uid, "exit before the controller leads; the guest will report again");
        return Err(Refusal::Unavailable);
    }
    if let Some(persist) = persist {
        let report = ExitReport {
            agent: channel.named(&uid),
            id: uid.clone(),
            exit: exit.clone(),
        };
        if let Err(why) = persist(report).await {
            tracing::debug!(agent = %uid, %why, "exit not persisted yet; the guest will report again");
            return Err(Refusal::Unavailable);
        }
    }
    let (new, vm) = channel.with_agent(&uid, &headers, Credential::Agent, |a| {
        (a.exit.replace(exit.clone()).is_none(), a.offered_to.take())
    })?;
    channel.claim_arrived(vm);
    if new {
        channel.emit(Event::Exited { uid, exit });
    }
    Ok(StatusCode::NO_CONTENT)
}

async fn secrets(
    State(channel): State<Channel>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Secrets>, Refusal> {
    channel
        .with_agent(&uid, &headers, Credential::Agent, |a| a.secrets.take())?
        .map(|secrets| Json(*secrets))
        .ok_or(Refusal::NotFound)
}

/// An idle VM's wait for its claim: answered with the claim as soon as one is offered, or with
/// 204 after [`limits::CLAIM_WAIT_SECONDS`], and the VM asks again.
async fn claim(
    State(channel): State<Channel>,
    Path(uid): Path<String>,
    headers: HeaderMap,
) -> Result<axum::response::Response, Refusal> {
    use axum::response::IntoResponse;
    let (first, offered) = channel.with_agent(&uid, &headers, Credential::Agent, |a| {
        (
            !std::mem::replace(&mut a.idle, true) && a.claim.is_none(),
            Arc::clone(a.offered.get_or_insert_default()),
        )
    })?;
    if first {
        channel.emit(Event::Idle { uid: uid.clone() });
    }
    let deadline = Instant::now() + Duration::from_secs(limits::CLAIM_WAIT_SECONDS);
    loop {
        // Registered before the claim is looked for, so an offer in between is not missed.
        let woken = offered.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if let Some(claim) = channel.agents().get(&uid).and_then(|a| a.claim.clone()) {
            return Ok(Json(claim).into_response());
        }
        tokio::select! {
            () = woken => {}
            () = tokio::time::sleep_until(deadline) => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

#[derive(serde::Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

/// A run's `namespace/name`, split.
fn split(name: Option<&str>) -> Option<(&str, &str)> {
    name?.split_once('/')
}

fn render(line: &LogLine) -> bytes::Bytes {
    bytes::Bytes::from(format!("{}\n", line.text))
}

async fn read_logs(
    State(channel): State<Channel>,
    Path((namespace, name)): Path<(String, String)>,
    axum::extract::Query(query): axum::extract::Query<LogQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Some(id) = channel.run_of(&namespace, &name) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no output known for FarAgent {namespace}/{name}\n"),
        )
            .into_response();
    };
    // Subscribe before reading the buffer, so no line falls between the two.
    let live = channel.subscribe();
    let backlog: Vec<bytes::Bytes> = channel
        .logs(&id)
        .map(|lines| lines.iter().map(render).collect())
        .unwrap_or_default();
    let exited = channel.view(&id).is_some_and(|v| v.exit.is_some());
    let head =
        futures_util::stream::iter(backlog.into_iter().map(Ok::<_, std::convert::Infallible>));
    if !query.follow || exited {
        return axum::body::Body::from_stream(head).into_response();
    }
    let tail = futures_util::stream::unfold((live, id), |(mut live, id)| async move {
        loop {
            match live.recv().await {
                Ok(Event::Logs { uid, lines }) if uid == id => {
                    let text: String = lines.iter().map(|l| format!("{}\n", l.text)).collect();
                    return Some((Ok(bytes::Bytes::from(text)), (live, id)));
                }
                Ok(Event::Exited { uid, .. }) if uid == id => return None,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    axum::body::Body::from_stream(futures_util::StreamExt::chain(head, tail)).into_response()
}
