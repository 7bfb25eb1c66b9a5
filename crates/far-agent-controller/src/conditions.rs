//! Standard Kubernetes conditions, merged by type.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Sets a condition; `lastTransitionTime` moves only when its status changes, so rewriting
/// the same condition is not a change.
pub fn set(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    match conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(existing) => {
            if existing.status != status {
                existing.last_transition_time = Time(now);
            }
            existing.status = status;
            existing.reason = reason.to_owned();
            existing.message = message.to_owned();
            existing.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: kind.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

/// Whether a condition is present and True.
pub fn is_true(conditions: &[Condition], kind: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == kind && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewriting_a_condition_keeps_its_transition_time() {
        let (t0, t1) = (
            Timestamp::from_second(100).unwrap(),
            Timestamp::from_second(200).unwrap(),
        );
        let mut c = Vec::new();
        set(&mut c, "Ready", true, "Probed", "ok", Some(1), t0);
        set(&mut c, "Ready", true, "Probed", "still ok", Some(1), t1);
        assert_eq!(
            (c.len(), c[0].last_transition_time.0, c[0].message.as_str()),
            (1, t0, "still ok")
        );
        set(&mut c, "Ready", false, "Unreachable", "down", Some(1), t1);
        assert_eq!(c[0].last_transition_time.0, t1);
        assert!(!is_true(&c, "Ready"));
    }
}
