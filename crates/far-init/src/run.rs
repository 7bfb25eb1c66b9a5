//! Running the agent: its process, output, heartbeats, signals and exit code.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread;
use std::time::{Duration, Instant};

use far_agent_protocol::{LogBatch, LogLine, RunConfig, Secrets, Stream, Task, limits, paths};
use rustix::process::{Pid, Signal, WaitOptions, kill_process, wait};

use crate::channel::Channel;
use crate::{Fatal, say, sysinfo};

/// Lines waiting to be shipped; beyond this, new lines are dropped (and counted) rather than
/// letting a chatty agent exhaust the guest's memory.
const LOG_QUEUE: usize = 10_000;
/// How often log lines are shipped.
const LOG_FLUSH: Duration = Duration::from_millis(200);
/// How long output is still collected after the agent exits (pipes held open by its children).
const LOG_DRAIN: Duration = Duration::from_secs(2);

/// Runs the agent to its end and returns its exit code (128 + signal when killed).
///
/// # Errors
/// [`Fatal::Start`] when the entrypoint cannot be started.
pub fn run_agent(
    config: &RunConfig,
    task: &Task,
    secrets: Secrets,
    channel: Arc<Channel>,
) -> Result<i32, Fatal> {
    let terminate = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(signal, Arc::clone(&terminate)) {
            say!("cannot watch signal {signal}: {e}");
        }
    }

    let mut command = Command::new(&task.entrypoint);
    command
        .args(&task.args)
        .env_clear()
        .envs(
            task.env
                .iter()
                .chain(&secrets.env)
                .map(|e| (&e.name, &e.value)),
        )
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let boot_to_entrypoint_ms = Some(sysinfo::uptime_ms());
    let mut child = command.spawn().map_err(|e| Fatal::Start {
        entrypoint: task.entrypoint.clone(),
        reason: e.to_string(),
    })?;
    drop(secrets);
    if let Some(ms) = boot_to_entrypoint_ms {
        say!("entrypoint started {ms} ms after the kernel");
    }
    let pid = i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| Fatal::Start {
            entrypoint: task.entrypoint.clone(),
            reason: format!("unusable pid {}", child.id()),
        })?;

    let (lines, queue) = sync_channel::<LogLine>(LOG_QUEUE);
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(out) = child.stdout.take() {
        read_lines(out, Stream::Stdout, lines.clone(), Arc::clone(&dropped));
    }
    if let Some(err) = child.stderr.take() {
        read_lines(err, Stream::Stderr, lines, Arc::clone(&dropped));
    }
    let exited = Arc::new(AtomicBool::new(false));
    let shipper = {
        let (channel, exited) = (Arc::clone(&channel), Arc::clone(&exited));
        thread::spawn(move || ship_logs(&queue, &channel, &exited))
    };
    let heartbeats = {
        let (channel, exited, terminate) = (
            Arc::clone(&channel),
            Arc::clone(&exited),
            Arc::clone(&terminate),
        );
        let interval = Duration::from_secs(task.heartbeat_interval_seconds.into());
        thread::spawn(move || {
            while !exited.load(Ordering::Relaxed) {
                let beat = sysinfo::heartbeat(Path::new("/proc"), boot_to_entrypoint_ms);
                match channel.heartbeat(&beat) {
                    // Stopped as by SIGTERM: the agent gets the grace period, its exit is reported.
                    Ok(reply) if reply.stop && !terminate.swap(true, Ordering::Relaxed) => {
                        say!("the controller asks the agent to stop");
                    }
                    Ok(_) => {}
                    Err(e) => say!("heartbeat not delivered: {e}"),
                }
                sleep_unless(&exited, interval);
            }
        })
    };

    let code = reap_until(
        pid,
        &terminate,
        Duration::from_secs(config.grace_period_seconds.into()),
    );
    exited.store(true, Ordering::Relaxed);
    let _ = heartbeats.join();
    let _ = shipper.join();
    let lost = dropped.load(Ordering::Relaxed);
    if lost > 0 {
        say!("{lost} log lines were dropped: the agent wrote faster than they could be shipped");
    }
    Ok(code)
}

fn sleep_unless(stop: &AtomicBool, total: Duration) {
    let until = Instant::now() + total;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        thread::sleep(
            Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())),
        );
    }
}

/// Reaps every child (PID 1 inherits orphans) until the agent itself exits; forwards SIGTERM
/// and kills after the grace period.
fn reap_until(agent: Pid, terminate: &AtomicBool, grace: Duration) -> i32 {
    let mut kill_at: Option<Instant> = None;
    loop {
        match wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) if pid == agent => {
                return status
                    .exit_status()
                    .or_else(|| status.terminating_signal().map(|s| 128 + s))
                    .unwrap_or(1);
            }
            Ok(Some(_orphan)) => continue,
            Ok(None) => {}
            Err(e) => {
                say!("waiting for the agent failed: {e}");
                return 1;
            }
        }
        if terminate.load(Ordering::Relaxed) && kill_at.is_none() {
            say!("stop requested: sending SIGTERM to the agent, SIGKILL in {grace:?}");
            let _ = kill_process(agent, Signal::TERM);
            kill_at = Some(Instant::now() + grace);
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            let _ = kill_process(agent, Signal::KILL);
            kill_at = Some(Instant::now() + Duration::from_secs(3600));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Copies one output stream to the console and into the log queue, line by line.
fn read_lines(
    stream: impl Read + Send + 'static,
    which: Stream,
    queue: SyncSender<LogLine>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
) {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader
                .by_ref()
                .take(limits::LOG_LINE_BYTES as u64)
                .read_until(b'\n', &mut buf)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            println!("{text}");
            match queue.try_send(LogLine {
                stream: which,
                text,
            }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    });
}

/// Ships queued lines in batches until the readers are done (or the drain time after the
/// agent's exit has passed).
fn ship_logs(queue: &Receiver<LogLine>, channel: &Channel, exited: &AtomicBool) {
    let mut seq = 0u64;
    let mut batch = Vec::new();
    let mut exit_seen: Option<Instant> = None;
    loop {
        let done = match queue.recv_timeout(LOG_FLUSH) {
            Ok(line) => {
                batch.push(line);
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        while batch.len() < limits::LOG_LINES_PER_BATCH {
            match queue.try_recv() {
                Ok(line) => batch.push(line),
                Err(_) => break,
            }
        }
        if exited.load(Ordering::Relaxed) {
            exit_seen.get_or_insert_with(Instant::now);
        }
        let drained = exit_seen.is_some_and(|at| at.elapsed() >= LOG_DRAIN);
        if !batch.is_empty() {
            let lines = std::mem::take(&mut batch);
            let shipment = LogBatch { seq, lines };
            let delivered = (0..3).any(|attempt| {
                if attempt > 0 {
                    thread::sleep(Duration::from_millis(200));
                }
                channel.post(paths::LOGS, &shipment).is_ok()
            });
            if !delivered {
                say!(
                    "log batch {seq} not delivered ({} lines)",
                    shipment.lines.len()
                );
            }
            seq += 1;
        }
        if done || drained {
            return;
        }
    }
}
