//! far-init: PID 1 in every FAR microVM.
//!
//! As the initrd's `/init` it loads the virtio modules shipped beside it, mounts the root
//! volume and switches into it; as `init=` inside a root filesystem it skips those steps. Then
//! it mounts what a process needs, brings up the network, reads the run configuration from the
//! metadata service, enrols with the status channel (its one-time enrolment token for the
//! agent's own), fetches secret values from it, starts the agent with
//! exactly its configured environment, streams its output, heartbeats, reaps zombies, forwards
//! SIGTERM, reports the exit code and powers the VM off.
//!
//! It never panics on bad input: every failure is printed on the console, reported on the
//! channel when one is known, and the VM powers off.

mod boot;
mod channel;
mod dhcp;
mod http;
mod metadata;
mod net;
mod reset;
mod run;
mod sysinfo;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use far_agent_protocol::{Exit, RUN_CONFIG_KEY, RunConfig, Secrets, Task, limits};

use crate::channel::Channel;
use crate::metadata::Metadata;

/// Where the metadata service answers (MMDS, as Flintlock provides it), unless the kernel
/// command line says `far.metadata=URL` (far-host's QEMU VMs: the service on the host's
/// loopback, reached through the host's address without a relay; or one elsewhere, for
/// debugging).
const METADATA_URL: &str = "http://169.254.169.254";

/// Present only in FAR's initrd: far-init is then the initrd's `/init`.
const INITRD_MODULE_LIST: &str = "/etc/far/modules";

/// Prints a line on the console, tagged so it stands out among the agent's output.
macro_rules! say {
    ($($arg:tt)*) => { println!("far-init: {}", format_args!($($arg)*)) };
}
pub(crate) use say;

/// Why the agent could not be run.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// Booting (modules, root volume, mounts) failed.
    #[error("boot: {0}")]
    Boot(String),
    /// The network could not be configured.
    #[error("network: {0}")]
    Network(String),
    /// The run configuration could not be read.
    #[error("metadata: {0}")]
    Metadata(String),
    /// The run configuration is unusable.
    #[error("run configuration: {0}")]
    Config(#[from] far_agent_protocol::RunConfigError),
    /// The channel did not give the agent its token (see [`Channel::enrol`]).
    #[error("enrolment: {0}")]
    Enrol(String),
    /// Secret values could not be fetched or written.
    #[error("secrets: {0}")]
    Secrets(String),
    /// An idle VM's wait for a claim failed, or the claim is unusable.
    #[error("claim: {0}")]
    Claim(String),
    /// A reused VM could not be made clean for its next task (see [`reset`]).
    #[error("reset: {0}")]
    Reset(String),
    /// The entrypoint could not be started.
    #[error("starting {entrypoint}: {reason}")]
    Start {
        /// The program.
        entrypoint: String,
        /// The OS's reason.
        reason: String,
    },
}

fn main() {
    let mut channel: Option<Arc<Channel>> = None;
    let outcome = init(&mut channel);
    let exit = match outcome {
        Ok(code) => Exit {
            code,
            start_error: None,
        },
        Err(fatal) => {
            say!("fatal: {fatal}");
            Exit {
                code: 127,
                start_error: Some(fatal.to_string()),
            }
        }
    };
    if let Some(channel) = &channel {
        channel.report_exit(&exit, Duration::from_secs(limits::EXIT_REPORT_SECONDS));
    }
    say!("agent exited with code {}; powering off", exit.code);
    boot::power_off(exit.code);
}

/// The metadata service's base URL from the kernel command line, or MMDS's address.
fn metadata_url(cmdline: &str) -> &str {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("far.metadata="))
        .unwrap_or(METADATA_URL)
}

/// When each boot step ended, in ms of uptime, so a slow boot names its slow step.
#[derive(Default)]
struct Timeline(Vec<(&'static str, u64)>);

impl Timeline {
    fn mark(&mut self, step: &'static str) {
        self.0.push((step, sysinfo::uptime_ms()));
    }

    /// `kernel 610 ms, modules +120 ms, ...`: `kernel` is when far-init began.
    fn summary(&self) -> String {
        let mut parts = Vec::new();
        let mut last = None;
        for (step, ms) in &self.0 {
            parts.push(match last {
                None => format!("{step} {ms} ms"),
                Some(last) => format!("{step} +{} ms", ms.saturating_sub(last)),
            });
            last = Some(*ms);
        }
        parts.join(", ")
    }
}

fn init(channel_out: &mut Option<Arc<Channel>>) -> Result<i32, Fatal> {
    let mut timeline = Timeline::default();
    timeline.mark("kernel");
    let in_initrd = Path::new(INITRD_MODULE_LIST).exists();
    boot::mount_pseudo_filesystems().map_err(Fatal::Boot)?;
    if in_initrd {
        if boot::load_modules(Path::new(INITRD_MODULE_LIST), &boot::kernel_release())
            .map_err(Fatal::Boot)?
            > 0
        {
            timeline.mark("modules");
        }
        boot::mount_root_and_switch(Path::new("/dev/vda"), Path::new("/newroot"))
            .map_err(Fatal::Boot)?;
        boot::mount_pseudo_filesystems().map_err(Fatal::Boot)?;
        timeline.mark("root");
    }
    boot::mount_runtime_filesystems().map_err(Fatal::Boot)?;
    let cmdline = boot::kernel_cmdline();
    for line in net::configure(&cmdline).map_err(Fatal::Network)? {
        say!("network: {line}");
    }
    timeline.mark("network");

    let metadata_url = metadata_url(&cmdline);
    say!("reading the run configuration from {metadata_url}");
    // A temporary: its kept connection closes once the configuration is read.
    let bytes = Metadata::new(metadata_url)
        .fetch(RUN_CONFIG_KEY, Duration::from_secs(30))
        .map_err(|e| Fatal::Metadata(e.to_string()))?;
    let config = RunConfig::parse(&bytes)?;
    timeline.mark("metadata");
    let channel = Arc::new(
        Channel::enrol(&config, Duration::from_secs(limits::ENROL_SECONDS))
            .map_err(|e| Fatal::Enrol(e.to_string()))?,
    );
    timeline.mark("enrolment");
    *channel_out = Some(Arc::clone(&channel));
    boot::mount_volumes(&config.mounts).map_err(Fatal::Boot)?;

    let Some(task) = &config.task else {
        return serve_claims(&config, &channel, channel_out, timeline);
    };
    let secrets = if task.has_secrets {
        channel
            .secrets()
            .map_err(|e| Fatal::Secrets(e.to_string()))?
    } else {
        Secrets::default()
    };
    start(&config, task, secrets, channel, timeline)
}

/// A pool's idle VM: waits for a claim and runs its task on the run's own channel; reused
/// (`reuse: Reset`), it is made clean once the exit is on record and waits again. Returns the
/// last task's exit code for `main` to report, or an error to power off on.
fn serve_claims(
    config: &RunConfig,
    channel: &Channel,
    channel_out: &mut Option<Arc<Channel>>,
    mut timeline: Timeline,
) -> Result<i32, Fatal> {
    let baseline = if config.reusable {
        Some(reset::prepare().map_err(Fatal::Reset)?)
    } else {
        None
    };
    loop {
        say!("idle: {}; waiting for a claim", timeline.summary());
        let claim = channel
            .wait_for_claim()
            .map_err(|e| Fatal::Claim(e.to_string()))?;
        claim.task.check()?;
        timeline.mark("claimed");
        let run = Arc::new(channel.for_run(&claim.run));
        *channel_out = Some(Arc::clone(&run));
        let code = start(
            config,
            &claim.task,
            claim.secrets,
            Arc::clone(&run),
            timeline,
        )?;
        let Some(baseline) = &baseline else {
            return Ok(code);
        };
        let exit = Exit {
            code,
            start_error: None,
        };
        if !run.report_exit(&exit, Duration::from_secs(limits::EXIT_REPORT_SECONDS)) {
            return Ok(code);
        }
        // The exit is on record: nothing is left to report if the reset fails.
        *channel_out = None;
        let started = Instant::now();
        reset::reset(baseline).map_err(Fatal::Reset)?;
        say!(
            "reset in {} ms: the VM is clean",
            started.elapsed().as_millis()
        );
        timeline = Timeline::default();
        timeline.mark("reset");
    }
}

/// Starts a task: the host name, its secret files, then the agent until it exits.
fn start(
    config: &RunConfig,
    task: &Task,
    secrets: Secrets,
    channel: Arc<Channel>,
    mut timeline: Timeline,
) -> Result<i32, Fatal> {
    say!(
        "running agent {}/{} (attempt {})",
        task.agent.namespace,
        task.agent.name,
        task.agent.attempt
    );
    if let Err(e) = rustix::system::sethostname(task.hostname.as_bytes()) {
        say!("cannot set hostname {:?}: {e}", task.hostname);
    }
    boot::write_secret_files(&secrets).map_err(Fatal::Secrets)?;
    timeline.mark("volumes and secrets");
    say!("boot: {}", timeline.summary());
    run::run_agent(config, task, secrets, channel)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_metadata_url_defaults_to_mmds_and_can_be_moved_on_the_kernel_command_line() {
        assert_eq!(
            super::metadata_url("console=ttyS0 quiet"),
            "http://169.254.169.254"
        );
        assert_eq!(
            super::metadata_url("quiet far.metadata=http://169.254.0.2:4000 x"),
            "http://169.254.0.2:4000"
        );
    }
}
