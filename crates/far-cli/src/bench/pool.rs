//! `far bench --pool`: claims on a warm FarAgentPool, measured as agent-sandbox's stress
//! harness measures its warm pools, so the figures compare.
//!
//! The pool is filled with `--pool-idle` idle VMs first (how long that takes is reported), then
//! `--agents` FarAgents claim from it, arriving as a Poisson process at `--rate` a second, or in
//! one burst. Reported: each create's acknowledgement, claim (create sent) -> Running
//! percentiles, the time until every claim was Running, how many were served warm and cold, the
//! time until the pool holds `--pool-idle` idle VMs again after the last claim ran, and the
//! sim hosts' count of duplicate and leaked VMs once the agents and the pool are deleted.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use far_api::{FarAgent, FarAgentPool, Phase};
use futures::StreamExt;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::watcher;
use serde_json::json;
use tokio::time::Instant;

use super::{ApiServer, BenchArgs, NAMESPACE, Rig, VmCount, process_usage, summary};

/// One claim: when its create was sent and acknowledged, and the exit code it asks for.
type Created = (Instant, Instant, i32);

/// The benchmark's pool.
const POOL: &str = "far-bench";

/// Exponential gaps with mean `1 / rate`: Poisson arrivals, the same on every run.
fn poisson_gaps(rate: f64) -> impl FnMut() -> Duration {
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // A uniform in (0, 1]: never 0, whose logarithm is infinite.
        let uniform = ((seed >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        Duration::from_secs_f64(-uniform.ln() / rate)
    }
}

/// Reads the pool's status until `done` holds, saying where it stands every 5 s.
async fn wait_pool(
    pools: &Api<FarAgentPool>,
    what: &str,
    deadline: Instant,
    done: impl Fn(&far_api::FarAgentPoolStatus) -> bool,
) -> Result<Instant> {
    let mut told = Instant::now();
    loop {
        let status = pools.get(POOL).await?.status.unwrap_or_default();
        if done(&status) {
            return Ok(Instant::now());
        }
        if told.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "far bench: {what}: {} idle, {} booting, {} busy",
                status.idle, status.booting, status.busy
            );
            told = Instant::now();
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: not within --timeout-seconds ({} idle, {} booting, {} busy)",
                status.idle,
                status.booting,
                status.busy
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn run(args: BenchArgs) -> Result<()> {
    let idle = if args.pool_idle == 0 {
        args.agents
    } else {
        args.pool_idle
    };
    let state = tempfile::Builder::new().prefix("far-bench-").tempdir()?;
    let api = ApiServer::start(args.kubeconfig.as_deref(), state.path()).await?;
    api.namespace().await?;
    // Room for the idle VMs, the claimed ones and the refill.
    let rig = Rig::start(&args, &api, state.path(), idle + args.agents).await?;
    let deadline = Instant::now() + args.timeout();

    let pools: Api<FarAgentPool> = Api::namespaced(api.client.clone(), NAMESPACE);
    let pool: FarAgentPool = serde_json::from_value(json!({
        "apiVersion": "tiffany.dev/v1", "kind": "FarAgentPool", "metadata": {"name": POOL},
        "spec": {"minIdle": idle, "maxSize": idle + args.agents,
                 "template": {"image": "busybox:1", "memory": "128Mi", "cpu": 1,
                              "entrypoint": "/usr/local/bin/tiffany",
                              "hostSelector": {"far-bench/run": rig.run_label}}}
    }))?;
    eprintln!(
        "far bench: filling pool {POOL} with {idle} idle VMs on {} sim hosts",
        args.hosts
    );
    let filling = Instant::now();
    pools.create(&PostParams::default(), &pool).await?;
    let filled = wait_pool(&pools, "filling the pool", deadline, |s| {
        s.idle >= idle as u32
    })
    .await?;
    let fill_seconds = filled.duration_since(filling).as_secs_f64();

    let agents: Api<FarAgent> = Api::namespaced(api.client.clone(), NAMESPACE);
    let mut events = watcher(agents.clone(), watcher::Config::default()).boxed();
    while let Some(event) = events.next().await {
        if matches!(
            event.context("watching FarAgents")?,
            watcher::Event::InitDone
        ) {
            break;
        }
    }
    eprintln!(
        "far bench: {} claims, {}",
        args.agents,
        if args.rate > 0.0 {
            format!("Poisson arrivals at {}/s", args.rate)
        } else {
            "in one burst".into()
        }
    );
    let started = Instant::now();
    let created: Arc<std::sync::Mutex<HashMap<String, Created>>> = Arc::default();
    let creator = {
        let (agents, created, run_seconds, rate, count) = (
            agents.clone(),
            Arc::clone(&created),
            args.run_seconds.to_string(),
            args.rate,
            args.agents,
        );
        let mut gap = poisson_gaps(rate.max(f64::MIN_POSITIVE));
        let mut at = started;
        let arrivals: Vec<Instant> = (0..count)
            .map(|_| {
                if rate > 0.0 {
                    at += gap();
                }
                at
            })
            .collect();
        tokio::spawn(async move {
            let results: Vec<Result<()>> = futures::stream::iter(arrivals.into_iter().enumerate())
                .map(|(i, arrival)| {
                    let (agents, created, run_seconds) =
                        (agents.clone(), Arc::clone(&created), run_seconds.clone());
                    async move {
                        tokio::time::sleep_until(arrival).await;
                        let name = format!("claim-{i:05}");
                        let code = if i % 10 == 9 { 3 } else { 0 };
                        let agent: FarAgent = serde_json::from_value(json!({
                            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent", "metadata": {"name": name},
                            "spec": {"poolRef": {"name": POOL},
                                     "args": ["--seconds", run_seconds, "--exit-code", code.to_string()],
                                     "heartbeat": {"intervalSeconds": 10, "timeoutSeconds": 60}}
                        }))
                        .context("claim manifest")?;
                        let sent = Instant::now();
                        agents
                            .create(&PostParams::default(), &agent)
                            .await
                            .with_context(|| format!("creating {name}"))?;
                        let acked = Instant::now();
                        created
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(name, (sent, acked, code));
                        anyhow::Ok(())
                    }
                })
                .buffer_unordered(if rate > 0.0 { 1024 } else { 32 })
                .collect()
                .await;
            results.into_iter().collect::<Result<()>>()
        })
    };

    let mut running: HashMap<String, Instant> = HashMap::new();
    let mut warm: HashMap<String, bool> = HashMap::new();
    let mut finished: HashMap<String, (Phase, Option<i32>)> = HashMap::new();
    let (finished_tx, finished_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let deleter = {
        let agents = agents.clone();
        tokio::spawn(async move {
            tokio_stream::wrappers::UnboundedReceiverStream::new(finished_rx)
                .for_each_concurrent(32, |name| {
                    let agents = agents.clone();
                    async move {
                        let _ = agents.delete(&name, &Default::default()).await;
                    }
                })
                .await;
        })
    };
    let mut gone = 0;
    while gone < args.agents {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.next()).await else {
            break;
        };
        let agent = match event {
            Ok(watcher::Event::Apply(agent) | watcher::Event::InitApply(agent)) => agent,
            Ok(watcher::Event::Delete(_)) => {
                gone += 1;
                continue;
            }
            _ => continue,
        };
        let name = kube::ResourceExt::name_any(&agent);
        let status = agent.status.unwrap_or_default();
        if status.phase.is_some() && status.phase != Some(Phase::Pending) {
            running.entry(name.clone()).or_insert_with(Instant::now);
        }
        if let Some(created) = status.conditions.iter().find(|c| c.type_ == "VMCreated") {
            warm.insert(name.clone(), created.reason == "WarmStart");
        }
        if let Some(phase) = status.phase.filter(|p| p.is_terminal())
            && finished
                .insert(name.clone(), (phase, status.exit_code))
                .is_none()
        {
            let _ = finished_tx.send(name);
        }
    }
    drop(finished_tx);
    creator.await.context("the creating task")??;
    let _ = deleter.await;
    let last_running = running.values().max().copied();
    let refilled = wait_pool(&pools, "refilling the pool", deadline, |s| {
        s.idle >= idle as u32
    })
    .await?;
    let refill_seconds = last_running.map(|t| refilled.duration_since(t).as_secs_f64());
    let claims_status = pools.get(POOL).await?.status.unwrap_or_default();

    // The pool goes, and with it its idle VMs: none may be left.
    pools.delete(POOL, &Default::default()).await?;
    let mut vms = VmCount::of(&rig.sims);
    let leak_deadline = Instant::now() + Duration::from_secs(30);
    while vms.leaked > 0 && Instant::now() < leak_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        vms = VmCount::of(&rig.sims);
    }
    let _ = rig.stop.send(());
    let controller_usage = rig
        .controller
        .as_ref()
        .and_then(tokio::process::Child::id)
        .map(|pid| process_usage(&pid.to_string()));
    if let Some(mut child) = rig.controller {
        let _ = child.kill().await;
    }
    super::delete_hosts(&api, &rig.host_names).await?;

    let created = created.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let acks: Vec<f64> = created
        .values()
        .map(|(sent, acked, _)| acked.duration_since(*sent).as_secs_f64())
        .collect();
    let to_running = |warm_only: Option<bool>| -> Vec<f64> {
        running
            .iter()
            .filter(|(n, _)| warm_only.is_none_or(|w| warm.get(*n) == Some(&w)))
            .filter_map(|(n, t)| Some(t.duration_since(created.get(n)?.0).as_secs_f64()))
            .collect()
    };
    let wrong = finished
        .iter()
        .filter(|(n, (phase, code))| {
            let want = created.get(*n).map_or(-1, |(_, _, c)| *c);
            *code != Some(want) || (*phase == Phase::Completed) != (want == 0)
        })
        .count();
    let served_warm = warm.values().filter(|w| **w).count();
    let report = json!({
        "claims": args.agents,
        "hosts": args.hosts,
        "pool_idle": idle,
        "arrivals": if args.rate > 0.0 { json!({"poisson_per_second": args.rate}) } else { json!("burst") },
        "pool_fill_seconds": fill_seconds,
        "finished": finished.len(),
        "lost": args.agents - finished.len(),
        "wrong_exit_or_phase": wrong,
        "served_warm": served_warm,
        "served_cold": warm.len() - served_warm,
        // As agent-sandbox's harness reports them.
        "create_ack_seconds": summary(acks),
        "claim_to_running_seconds": summary(to_running(None)),
        "warm_claim_to_running_seconds": summary(to_running(Some(true))),
        "cold_claim_to_running_seconds": summary(to_running(Some(false))),
        "all_running_seconds": last_running.map(|t| t.duration_since(started).as_secs_f64()),
        // From the last claim reaching Running until the pool again held pool_idle idle VMs.
        "refill_seconds": refill_seconds,
        "pool_status_warm_claims": claims_status.warm_claims,
        "pool_status_cold_claims": claims_status.cold_claims,
        "vms_created": vms.created,
        "duplicate_vms": vms.duplicates,
        "leaked_vms": vms.leaked,
        "controller_peak_rss_mib": controller_usage.map(|(rss, _)| rss),
        "controller_cpu_seconds": controller_usage.map(|(_, cpu)| cpu),
        "process_peak_rss_mib": process_usage("self").0,
    });
    print_table(&report);
    println!("{}", serde_json::to_string_pretty(&report)?);
    if finished.len() < args.agents || wrong > 0 || vms.duplicates > 0 || vms.leaked > 0 {
        bail!(
            "{} of {} claims finished, {wrong} with the wrong phase or exit code; {} duplicate and {} leaked VMs",
            finished.len(),
            args.agents,
            vms.duplicates,
            vms.leaked
        );
    }
    Ok(())
}

fn print_table(r: &serde_json::Value) {
    let seconds = |key: &str| {
        let s = &r[key];
        format!(
            "p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}  (n={})",
            s["p50"].as_f64().unwrap_or(f64::NAN),
            s["p95"].as_f64().unwrap_or(f64::NAN),
            s["p99"].as_f64().unwrap_or(f64::NAN),
            s["max"].as_f64().unwrap_or(f64::NAN),
            s["count"]
        )
    };
    println!("{:<34} {}", "claims", r["claims"]);
    println!("{:<34} {}", "arrivals", r["arrivals"]);
    println!(
        "{:<34} {} idle VMs in {:.1} s",
        "pool filled",
        r["pool_idle"],
        r["pool_fill_seconds"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "{:<34} {} warm, {} cold",
        "served", r["served_warm"], r["served_cold"]
    );
    println!("{:<34} {}", "create ack (s)", seconds("create_ack_seconds"));
    println!(
        "{:<34} {}",
        "claim -> Running (s)",
        seconds("claim_to_running_seconds")
    );
    println!(
        "{:<34} {}",
        "  warm (s)",
        seconds("warm_claim_to_running_seconds")
    );
    println!(
        "{:<34} {}",
        "  cold (s)",
        seconds("cold_claim_to_running_seconds")
    );
    println!(
        "{:<34} {}",
        "all Running after (s)", r["all_running_seconds"]
    );
    println!("{:<34} {}", "pool refilled after (s)", r["refill_seconds"]);
    println!(
        "{:<34} {} created, {} duplicate, {} leaked",
        "VMs", r["vms_created"], r["duplicate_vms"], r["leaked_vms"]
    );
    println!(
        "{:<34} {} lost, {} wrong",
        "claims", r["lost"], r["wrong_exit_or_phase"]
    );
}
