//! The `sim` provider: no VM at all. It plays the guest's part, the way KWOK plays kubelets, so
//! the control plane can be exercised with thousands of agents on one machine.
//!
//! The simulated guest reads the run configuration from the VM's metadata, like far-init, and
//! talks to the status channel for real: heartbeats, a log batch, and the exit code. What it does
//! is steered by the agent's arguments:
//! - `--seconds N` (decimal allowed): run for N seconds (default 1), then exit;
//! - `--exit-code N`: exit with N (default 0);
//! - `--sim-silent`: never report in (a guest that does not boot);
//! - `--sim-hang`: report in, then stop heartbeating without exiting (a guest that hangs);
//! - `--sim-crash`: report in, heartbeat for `--seconds`, then end without reporting an exit
//!   (a guest that crashes: the VM's process is gone).
//!
//! Host-side failure injection: [`SimConfig::fail_starts_containing`] makes starting every VM
//! whose id contains the text fail, as a broken image or hypervisor would.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use far_agent_protocol::{
    Claim, Enrolment, Exit, Heartbeat, HeartbeatReply, LogBatch, LogLine, RUN_CONFIG_KEY,
    RunConfig, RunGrant, Secrets, Stream, Task, limits, paths,
};
use flintlock_proto::types::MicroVmSpec;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{Provider, ProviderError, Started};
use crate::record::VmRecord;

/// Settings of the sim provider.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Time from start to the first heartbeat, as a boot would take.
    pub boot_delay: Duration,
    /// Starting a VM whose id contains this fails.
    pub fail_starts_containing: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            boot_delay: Duration::from_millis(50),
            fail_starts_containing: None,
        }
    }
}

/// The sim provider.
#[derive(Debug, Clone)]
pub struct Sim {
    config: SimConfig,
    client: reqwest::Client,
    guests: Arc<Mutex<HashMap<String, Running>>>,
    exits: ExitTimes,
}

/// A simulated guest's task, and whether it is reporting its exit.
#[derive(Debug)]
struct Running {
    task: JoinHandle<()>,
    reporting_exit: Arc<AtomicBool>,
}

/// How long each guest's exit report took to be acknowledged, first send to acknowledgement.
type ExitTimes = Arc<Mutex<Vec<Duration>>>;

/// A guest's exit report: whether it is under way, and where its time goes.
struct Reporting {
    now: Arc<AtomicBool>,
    took: ExitTimes,
}

impl Sim {
    /// A sim provider with these settings.
    pub fn new(config: SimConfig) -> Self {
        far_tls::install();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(64)
            // As far-init keeps its connection to the channel: no longer than the channel does.
            .pool_idle_timeout(Duration::from_secs(
                far_agent_protocol::limits::CLIENT_IDLE_SECONDS,
            ))
            .build()
            .unwrap_or_default();
        Self {
            config,
            client,
            guests: Arc::default(),
            exits: Arc::default(),
        }
    }

    /// For each guest that reported its exit: the time from its first report to the channel's
    /// acknowledgement, which comes once the exit is recorded (for FAR's controller: in the
    /// agent's status), as the guest sees it.
    pub fn exit_acknowledgements(&self) -> Vec<Duration> {
        self.exits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn launch(&self, uid: &str, spec: &MicroVmSpec) {
        let guest = Guest::from_spec(spec);
        let reporting_exit = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(guest.run(
            self.client.clone(),
            self.config.boot_delay,
            Reporting {
                now: Arc::clone(&reporting_exit),
                took: Arc::clone(&self.exits),
            },
        ));
        let running = Running {
            task,
            reporting_exit,
        };
        if let Some(old) = self
            .guests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid.to_owned(), running)
        {
            old.task.abort();
        }
    }
}

impl Provider for Sim {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn start(&self, record: &VmRecord, spec: &MicroVmSpec) -> Result<Started, ProviderError> {
        if let Some(text) = &self.config.fail_starts_containing
            && spec.id.contains(text.as_str())
        {
            return Err(ProviderError(format!(
                "sim: injected start failure for VM {:?}",
                spec.id
            )));
        }
        self.launch(&record.uid, spec);
        Ok(Started { process: None })
    }

    async fn stop(&self, record: &VmRecord) -> Result<(), ProviderError> {
        let running = self
            .guests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&record.uid);
        if let Some(mut running) = running {
            // A guest whose exit report is answered already is let read the answer, so its
            // timing is kept: a VM deleted right after its agent's exit is in status, as every
            // finished agent's is, would otherwise lose it.
            if running.reporting_exit.load(Ordering::SeqCst) {
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut running.task).await;
            }
            running.task.abort();
        }
        Ok(())
    }

    async fn adopt(&self, record: &VmRecord, spec: &MicroVmSpec) -> bool {
        // A simulated guest lives in far-host's process: after a restart it boots again, as a
        // VM whose host rebooted would. One that had exited stays exited.
        if !record.guest_exited {
            self.launch(&record.uid, spec);
        }
        true
    }

    fn has_exited(&self, record: &VmRecord) -> bool {
        self.guests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&record.uid)
            .is_some_and(|r| r.task.is_finished())
    }
}

/// What the simulated guest will do.
#[derive(Debug, Clone, PartialEq)]
struct Behaviour {
    seconds: f64,
    exit_code: i32,
    silent: bool,
    hang: bool,
    crash: bool,
}

impl Behaviour {
    fn from_args(args: &[String]) -> Self {
        let mut b = Behaviour {
            seconds: 1.0,
            exit_code: 0,
            silent: false,
            hang: false,
            crash: false,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--seconds" => {
                    b.seconds = it.next().and_then(|v| v.parse().ok()).unwrap_or(b.seconds)
                }
                "--exit-code" => {
                    b.exit_code = it
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(b.exit_code)
                }
                "--sim-silent" => b.silent = true,
                "--sim-hang" => b.hang = true,
                "--sim-crash" => b.crash = true,
                _ => {}
            }
        }
        b.seconds = b.seconds.clamp(0.0, 86_400.0);
        b
    }
}

struct Guest {
    id: String,
    config: Result<RunConfig, String>,
}

impl Guest {
    fn from_spec(spec: &MicroVmSpec) -> Self {
        let config = spec
            .metadata
            .get(RUN_CONFIG_KEY)
            .ok_or_else(|| format!("no {RUN_CONFIG_KEY:?} metadata"))
            .and_then(|b64| {
                STANDARD
                    .decode(b64)
                    .map_err(|e| format!("metadata is not base64: {e}"))
            })
            .and_then(|bytes| RunConfig::parse(&bytes).map_err(|e| e.to_string()));
        Self {
            id: spec.id.clone(),
            config,
        }
    }

    async fn run(self, client: reqwest::Client, boot_delay: Duration, exit: Reporting) {
        let config = match self.config {
            Ok(config) => config,
            Err(problem) => {
                // A real guest would print this on its console and power off.
                warn!(vm = %self.id, %problem, "sim guest cannot start");
                return;
            }
        };
        tokio::time::sleep(boot_delay).await;
        if let Some(task) = &config.task
            && Behaviour::from_args(&task.args).silent
        {
            std::future::pending::<()>().await;
        }
        let Some(token) = enrol(&client, &config).await else {
            // A real far-init says so on its console and powers off.
            warn!(vm = %self.id, "sim guest: enrolment refused or unreachable; powering off");
            return;
        };
        let channel = Channel {
            client,
            base: config.channel.url.trim_end_matches('/').to_owned(),
            id: config.channel.id.clone(),
            token,
        };
        if let Some(task) = &config.task {
            if task.has_secrets && !channel.fetch_secrets().await {
                warn!(vm = %self.id, "sim guest: no secret values from the channel; powering off");
                return;
            }
            run_task(&channel, task, &exit).await;
            return;
        }
        // A pool's idle VM: it waits for a claim as far-init does, runs the task on the run's
        // own channel id and, reused (`reuse: Reset`), waits again once the exit is on record.
        loop {
            let Some(claim) = channel.wait_for_claim().await else {
                warn!(vm = %self.id, "sim guest: the channel refused the wait for a claim; powering off");
                return;
            };
            let acknowledged = run_task(&channel.for_run(&claim.run), &claim.task, &exit).await;
            if !(config.reusable && acknowledged) {
                return;
            }
            exit.now.store(false, Ordering::SeqCst);
        }
    }
}

/// Runs one task as its arguments say ([`Behaviour`]) and reports its exit as far-init does;
/// whether the exit was acknowledged.
async fn run_task(channel: &Channel, task: &Task, exit: &Reporting) -> bool {
    let behaviour = Behaviour::from_args(&task.args);
    let interval = Duration::from_secs(task.heartbeat_interval_seconds.into());
    channel.heartbeat().await;
    let line = format!("sim: {} {}", task.entrypoint, task.args.join(" "));
    channel
        .post(
            paths::LOGS,
            &LogBatch {
                seq: 0,
                lines: vec![LogLine {
                    stream: Stream::Stdout,
                    text: line,
                }],
            },
        )
        .await;
    if behaviour.hang {
        std::future::pending::<()>().await;
    }
    let run = tokio::time::sleep(Duration::from_secs_f64(behaviour.seconds));
    tokio::pin!(run);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut exit_code = behaviour.exit_code;
    loop {
        tokio::select! {
            () = &mut run => break,
            _ = ticks.tick() => if channel.heartbeat().await {
                // As far-init does: the agent is sent SIGTERM and ends by it.
                exit_code = 128 + 15;
                break;
            },
        }
    }
    if behaviour.crash {
        // The guest dies without a word: the VM's process ends, no exit is reported.
        return false;
    }
    exit.now.store(true, Ordering::SeqCst);
    let Some(took) = channel.exit(exit_code).await else {
        return false;
    };
    exit.took
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(took);
    true
}

/// Exchanges the run configuration's enrolment token for the agent's token, as far-init does:
/// retried while the channel cannot be reached (as long as far-init tries), given up when it
/// refuses.
async fn enrol(client: &reqwest::Client, config: &RunConfig) -> Option<String> {
    let url = format!(
        "{}{}",
        config.channel.url.trim_end_matches('/'),
        paths::for_agent(paths::ENROL, &config.channel.id)
    );
    let tries = far_agent_protocol::limits::ENROL_SECONDS * 1000 / 200;
    for _ in 0..tries {
        let sent = client
            .post(&url)
            .bearer_auth(&config.channel.enrolment_token)
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => {
                return response.json::<Enrolment>().await.ok().map(|e| e.token);
            }
            Ok(response) if !response.status().is_server_error() => {
                debug!(%url, status = %response.status(), "sim guest: enrolment refused");
                return None;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    None
}

/// The guest's side of the status channel, for one channel id.
struct Channel {
    client: reqwest::Client,
    base: String,
    id: String,
    token: String,
}

impl Channel {
    /// The same channel, for the claimed run `grant` names.
    fn for_run(&self, grant: &RunGrant) -> Self {
        Self {
            client: self.client.clone(),
            base: self.base.clone(),
            id: grant.id.clone(),
            token: grant.token.clone(),
        }
    }

    fn url(&self, route: &str) -> String {
        format!("{}{}", self.base, paths::for_agent(route, &self.id))
    }

    async fn post<T: serde::Serialize>(&self, route: &str, body: &T) -> bool {
        self.send(route, body).await.is_some()
    }

    /// POSTs `body`; the answer when it is a success.
    async fn send<T: serde::Serialize>(&self, route: &str, body: &T) -> Option<reqwest::Response> {
        let url = self.url(route);
        let mut request = self.client.post(&url).bearer_auth(&self.token).json(body);
        // As far-init asks: the controller then holds no connection for it between heartbeats.
        if paths::closes_connection(route) {
            request = request.header(reqwest::header::CONNECTION, "close");
        }
        let sent = request.send().await;
        match sent {
            Ok(response) if response.status().is_success() => Some(response),
            Ok(response) => {
                debug!(%url, status = %response.status(), "sim guest: channel refused");
                None
            }
            Err(e) => {
                debug!(%url, error = %e, "sim guest: channel unreachable");
                None
            }
        }
    }

    /// Fetches the agent's secret values as far-init does (and, being a simulation, drops them).
    async fn fetch_secrets(&self) -> bool {
        let url = self.url(paths::SECRETS);
        match self.client.get(&url).bearer_auth(&self.token).send().await {
            Ok(response) if response.status().is_success() => {
                response.json::<Secrets>().await.is_ok()
            }
            _ => false,
        }
    }

    /// Waits for an agent to claim this idle VM, asking again after each empty answer, as
    /// far-init does; `None` when the channel refuses.
    async fn wait_for_claim(&self) -> Option<Claim> {
        let url = self.url(paths::CLAIM);
        loop {
            let sent = self
                .client
                .get(&url)
                .bearer_auth(&self.token)
                .timeout(Duration::from_secs(limits::CLAIM_WAIT_SECONDS + 10))
                .send()
                .await;
            match sent {
                Ok(response) if response.status() == reqwest::StatusCode::OK => {
                    return response.json::<Claim>().await.ok();
                }
                Ok(response) if response.status().is_client_error() => {
                    debug!(%url, status = %response.status(), "sim guest: claim refused");
                    return None;
                }
                // No claim yet (204), or the channel unreachable for a moment.
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Sends a heartbeat; whether the channel asks the agent to stop.
    async fn heartbeat(&self) -> bool {
        let beat = Heartbeat {
            boot_to_entrypoint_ms: Some(50),
            memory_used_bytes: 64 << 20,
            memory_total_bytes: 512 << 20,
            cpu_used_ms: 10,
        };
        match self.send(paths::HEARTBEAT, &beat).await {
            Some(response) => response
                .json::<HeartbeatReply>()
                .await
                .is_ok_and(|reply| reply.stop),
            None => false,
        }
    }

    /// Reports the exit until the channel acknowledges it, within a bound, as far-init does;
    /// answers how long that took.
    async fn exit(&self, code: i32) -> Option<Duration> {
        let exit = Exit {
            code,
            start_error: None,
        };
        // As far-init does: for as long, backing off from 100 ms to 5 s.
        let first = tokio::time::Instant::now();
        let within = Duration::from_secs(limits::EXIT_REPORT_SECONDS);
        let mut delay = Duration::from_millis(100);
        while first.elapsed() < within {
            if self.post(paths::EXIT, &exit).await {
                return Some(first.elapsed());
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        warn!(agent = %self.id, "sim guest: exit never acknowledged");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn behaviour_comes_from_the_agents_arguments() {
        assert_eq!(
            Behaviour::from_args(&args("--task sleep --seconds 2.5 --exit-code 3")),
            Behaviour {
                seconds: 2.5,
                exit_code: 3,
                silent: false,
                hang: false,
                crash: false,
            }
        );
        let b = Behaviour::from_args(&args("--sim-hang --seconds -4 --exit-code x"));
        assert_eq!((b.seconds, b.exit_code, b.hang), (0.0, 0, true));
        assert!(Behaviour::from_args(&args("--sim-silent")).silent);
        assert!(Behaviour::from_args(&args("--sim-crash")).crash);
    }
}
