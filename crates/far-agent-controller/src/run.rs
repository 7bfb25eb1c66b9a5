//! Wiring: watches, the controller loop, channel reports as reconcile triggers, host probing.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use far_api::{FarAgentPool, FlintlockHost};
use futures::{StreamExt, TryStreamExt};
use kube::Api;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use tokio_stream::wrappers::BroadcastStream;
use tracing::{info, warn};

use crate::cache::CachedAgent;
use crate::flintlock::Pool;
use crate::reconcile::{Config, Context, error_policy, reconcile};

/// The annotation `kubectl apply` (client-side) keeps the whole applied object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What the controller caches of an object: not the API server's field bookkeeping
/// (`managedFields`) nor kubectl's copy of the object, which the controller never reads and
/// which would otherwise be most of a cached agent (measured: 88 MiB with 10,000 agents
/// without them, 234 MiB with them).
fn trim<K: kube::Resource>(object: &mut K) {
    let metadata = object.meta_mut();
    metadata.managed_fields = None;
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    config: Config,
    channel: far_channel::Channel,
    reporter: Reporter,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let agents: Api<CachedAgent> = Api::all(client.clone());
    let hosts_api: Api<FlintlockHost> = Api::all(client.clone());

    // The FlintlockHost and FarAgentPool caches are filled by the same watches that trigger
    // reconciles on their changes (below): a reconcile a host's change triggers then reads that
    // change in the cache. (With a second watch of its own, a reconcile could run before the
    // cache had the host turned Ready, find no host, and wait for the host's next change.)
    let (hosts, hosts_writer) = reflector::store();
    let host_watch = watcher(hosts_api, watcher::Config::default())
        .default_backoff()
        .reflect(hosts_writer)
        .applied_objects()
        .inspect_err(|e| warn!(error = %e, "FlintlockHost watch"));

    let (pools, pools_writer) = reflector::store();
    let pool_watch = watcher(
        Api::<FarAgentPool>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(trim)
    .reflect(pools_writer)
    .applied_objects()
    .inspect_err(|e| warn!(error = %e, "FarAgentPool watch"));

    let (cache, cache_writer) = reflector::store();
    let agent_watch =
        reflector(cache_writer, watcher(agents, watcher::Config::default())).applied_objects();
    let controller = Controller::for_stream(agent_watch, cache)
        .with_config(kube::runtime::controller::Config::default().concurrency(config.concurrency));
    // A host that changes (turns Ready, gains room, is uncordoned) may fit agents that waited.
    let waiting = controller.store();
    let controller = controller.watches_stream(host_watch, move |_host| {
        waiting
            .state()
            .into_iter()
            .filter(|a| !a.finished() && a.status.as_ref().is_none_or(|s| s.host.is_none()))
            .map(|a| reflector::ObjectRef::from_obj(a.as_ref()))
            .collect::<Vec<_>>()
    });
    // A pool that appears decides the agents that wait for it. (Only those: a pool's status
    // changes every second while it fills, and its other agents are decided on their own.)
    let claiming = controller.store();
    let controller = controller.watches_stream(pool_watch, move |pool| {
        let (namespace, name) = (pool.metadata.namespace.clone(), pool.metadata.name.clone());
        claiming
            .state()
            .into_iter()
            .filter(|a| {
                a.metadata.namespace == namespace
                    && a.pool == name
                    && a.status
                        .as_ref()
                        .is_some_and(|s| s.reason == Some(far_api::AgentReason::PoolNotFound))
            })
            .map(|a| reflector::ObjectRef::from_obj(a.as_ref()))
            .collect::<Vec<_>>()
    });
    let (kick, kicked) = tokio::sync::mpsc::unbounded_channel();
    let ctx = Arc::new(Context {
        client: client.clone(),
        flintlock: Pool::new(config.call_timeout, Arc::clone(&metrics)),
        metrics,
        config,
        channel: channel.clone(),
        hosts: hosts.clone(),
        agents: controller.store(),
        pools,
        unreachable: Default::default(),
        credentials: Default::default(),
        reporter,
        agents_ready: AtomicBool::new(false),
        ended: Default::default(),
        kick,
        superseded: Arc::default(),
        refusals: Default::default(),
        unsent: Default::default(),
        failures: Default::default(),
        pool_vms: Default::default(),
        listening_since: k8s_openapi::jiff::Timestamp::now(),
    });

    let exits = Arc::clone(&ctx);
    channel.persist_exits(Arc::new(move |report| {
        let ctx = Arc::clone(&exits);
        Box::pin(async move { crate::reconcile::persist_exit(&ctx, report).await })
    }));

    // The first heartbeat and the exit of an agent reconcile it at once; other heartbeats only
    // refresh the channel's memory, which the heartbeat watch reads (`crate::liveness`).
    let named = Arc::clone(&ctx);
    let triggers = BroadcastStream::new(channel.subscribe()).filter_map(move |event| {
        let ctx = Arc::clone(&named);
        async move {
            let event = event.ok()?;
            if let far_channel::Event::Heartbeat {
                first, heartbeat, ..
            } = &event
            {
                ctx.metrics.heartbeat(*first, heartbeat);
            }
            let id = match event {
                far_channel::Event::Heartbeat {
                    uid, first: true, ..
                }
                | far_channel::Event::Exited { uid, .. } => uid,
                _ => return None,
            };
            ctx.agent_named(&id)
        }
    });

    let ready = Arc::clone(&ctx);
    let agents_store = ctx.agents.clone();
    let hosts_ready = hosts.clone();
    let pools_ready = ready.pools.clone();
    let prober = async move {
        until_ready(&agents_store).await;
        until_ready(&hosts_ready).await;
        until_ready(&pools_ready).await;
        // Before anything may read "no agent holds this VM" off the cache.
        ready
            .pool_vms
            .learn_holders(agents_store.state().iter().map(AsRef::as_ref));
        ready.agents_ready.store(true, Ordering::Relaxed);
        ready.metrics.set_ready();
        info!("caches filled");
        ready.config.ui.attach(&ready);
        tokio::join!(
            crate::hosts::run(Arc::clone(&ready)),
            crate::liveness::run(Arc::clone(&ready)),
            ready.config.ui.clone().publish(),
            crate::pools::run(ready)
        );
    };

    let reconciling = controller
        .reconcile_on(futures::stream::select(
            triggers,
            tokio_stream::wrappers::UnboundedReceiverStream::new(kicked),
        ))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile");
            }
        });
    // One future, not spawned tasks: when the controller stops (or this future is dropped, as
    // with the process), host probing and orphan collection stop with it and act no more.
    tokio::select! {
        () = reconciling => {}
        () = prober => {}
    }
    info!("controller stopped");
}

/// Waits until a reflector store has been filled. Polled, because a `wait_until_ready` future
/// awaited before the store is filled was seen never to wake here (kube-runtime 5.0.0).
async fn until_ready<K: kube::Resource + Clone + 'static>(store: &reflector::Store<K>)
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    use futures::FutureExt as _;
    while store.wait_until_ready().now_or_never().is_none() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Runs the controller only while this replica holds the Lease: waits to lead, then runs until
/// `shutdown` resolves or the lead is lost (then returns, and the process should exit so a
/// fresh replica competes again).
pub async fn run_leading(
    client: kube::Client,
    config: Config,
    channel: far_channel::Channel,
    reporter: Reporter,
    metrics: Arc<crate::metrics::Metrics>,
    election: crate::leader::Election,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let mut leading = crate::leader::campaign(client.clone(), election);
    let mut shutdown = Box::pin(shutdown);
    loop {
        if *leading.borrow() {
            break;
        }
        tokio::select! {
            () = &mut shutdown => return,
            changed = leading.changed() => if changed.is_err() { return },
        }
    }
    info!("leading: starting the controller");
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            () = async {
                while *leading.borrow() {
                    if leading.changed().await.is_err() {
                        break;
                    }
                }
            } => warn!("lost the lead: stopping"),
        }
    };
    run(client, config, channel, reporter, metrics, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_what_the_controller_reads_and_drops_the_bookkeeping() {
        let mut agent: far_api::FarAgent = serde_json::from_value(serde_json::json!({
            "apiVersion": "tiffany.dev/v1", "kind": "FarAgent",
            "metadata": {"name": "a", "namespace": "n", "uid": "u", "resourceVersion": "7",
                "finalizers": ["tiffany.dev/vm-cleanup"], "labels": {"team": "x"},
                "annotations": {LAST_APPLIED: "{...}", "note": "kept"},
                "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"image": "busybox:1", "memory": "256Mi", "cpu": 1, "entrypoint": "/bin/true"},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        let mut expected = agent.clone();
        trim(&mut agent);
        assert_eq!(agent.metadata.managed_fields, None);
        assert_eq!(
            agent.metadata.annotations,
            Some([("note".to_owned(), "kept".to_owned())].into())
        );
        // Everything else as it came.
        expected.metadata.managed_fields = None;
        expected.metadata.annotations = agent.metadata.annotations.clone();
        assert_eq!(
            serde_json::to_value(&agent).unwrap(),
            serde_json::to_value(&expected).unwrap()
        );
    }
}
