//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas are safe: only the
//! holder reconciles.
//!
//! Every write is a PUT carrying the resourceVersion read just before, so when two replicas race
//! for a free or expired Lease the API server lets exactly one through (the other gets 409).
//! The holder renews every third of the lease duration; another replica takes over only once
//! the holder has not renewed for a whole duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tracing::{info, warn};

/// Who competes for which Lease.
#[derive(Clone, Debug)]
pub struct Election {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its Pod name).
    pub identity: String,
    /// How long a holder that stops renewing keeps the Lease.
    pub duration: Duration,
}

/// What one attempt found.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Leading,
    Following,
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let duration = spec.lease_duration_seconds.map_or(15, i64::from);
    match &spec.renew_time {
        Some(MicroTime(renewed)) => now.duration_since(*renewed).as_secs() >= duration,
        None => true,
    }
}

async fn attempt(api: &Api<Lease>, e: &Election) -> Result<Outcome, kube::Error> {
    let now = Timestamp::now();
    let seconds = i32::try_from(e.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&e.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(e.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(e.identity.clone()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Outcome::Leading),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Following),
            Err(err) => Err(err),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let mine = spec.holder_identity.as_deref() == Some(e.identity.as_str());
    if !mine && !expired(spec, now) {
        return Ok(Outcome::Following);
    }
    if !mine {
        spec.holder_identity = Some(e.identity.clone());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(seconds);
    match api.replace(&e.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Outcome::Leading),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Following),
        Err(err) => Err(err),
    }
}

/// Competes for the Lease forever; the receiver says whether this replica leads. An API error
/// while leading counts as losing the lead: better no leader for a moment than two.
pub fn campaign(client: kube::Client, election: Election) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &election.namespace);
        let mut ticks = tokio::time::interval(election.duration / 3);
        loop {
            ticks.tick().await;
            let leading = match attempt(&api, &election).await {
                Ok(outcome) => outcome == Outcome::Leading,
                Err(e) => {
                    warn!(error = %e, "lease not renewed");
                    false
                }
            };
            if *tx.borrow() != leading {
                info!(identity = %election.identity, leading, "leadership changed");
            }
            if tx.send(leading).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_expires_a_duration_after_its_last_renewal() {
        let renewed = Timestamp::from_second(1_000).unwrap();
        let spec = LeaseSpec {
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(15),
            ..Default::default()
        };
        assert!(!expired(&spec, Timestamp::from_second(1_014).unwrap()));
        assert!(expired(&spec, Timestamp::from_second(1_015).unwrap()));
        assert!(expired(&LeaseSpec::default(), renewed));
    }
}
