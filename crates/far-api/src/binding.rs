//! Where an attempt of a FarAgent was placed, recorded on the FarAgent itself before its VM is
//! created.
//!
//! Flintlock's CreateMicroVM is not idempotent, and a write after it can be lost (refused,
//! timed out, or the controller killed in between). So the host is written first, fenced by
//! the agent's resourceVersion, in the annotation [`BINDING_ANNOTATION`] (with the finalizer,
//! for the first attempt: no extra write); the VM's uid follows in status. Any later reconcile
//! that finds no VM uid in status asks the bound host for the attempt's VM by name and adopts
//! it. The binding is to the agent what `spec.nodeName` is to a Pod.

use serde::{Deserialize, Serialize};

use crate::{FarAgent, FarAgentStatus, VmSize};

/// The annotation holding an agent's [`Binding`] as JSON.
pub const BINDING_ANNOTATION: &str = "tiffany.dev/binding";

/// One attempt's host and VM size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Binding {
    /// The attempt (`status.restartCount` when it was placed).
    pub attempt: u32,
    /// The FlintlockHost.
    pub host: String,
    /// The VM's size there.
    pub vm: VmSize,
    /// The idle VM of the agent's pool that this attempt claimed (its Flintlock name); none when
    /// the attempt boots its own VM. Written before the claim is offered to the VM, so a
    /// restarted controller knows every claimed VM from its agents and never offers one twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed: Option<String>,
}

impl Binding {
    /// The annotation's value.
    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// An annotation's binding; none when it does not parse (someone edited it).
    pub fn from_annotation(value: &str) -> Option<Self> {
        serde_json::from_str(value).ok()
    }

    /// `self` if it binds the attempt `status` is on; an earlier attempt's binding is none.
    pub fn of_current_attempt(self, status: Option<&FarAgentStatus>) -> Option<Self> {
        (self.attempt == status.map_or(0, |s| s.restart_count)).then_some(self)
    }

    /// Where an agent's current attempt is placed: what its `status` says, else its current
    /// attempt's `binding`.
    pub fn placement(status: Option<&FarAgentStatus>, binding: Option<&Self>) -> Option<Self> {
        let binding = binding.and_then(|b| b.clone().of_current_attempt(status));
        match status {
            Some(FarAgentStatus {
                host: Some(host),
                vm: Some(vm),
                restart_count,
                ..
            }) => Some(Self {
                attempt: *restart_count,
                host: host.clone(),
                vm: *vm,
                claimed: binding.and_then(|b| b.claimed),
            }),
            _ => binding,
        }
    }
}

impl FarAgent {
    /// The binding of the agent's current attempt, if it has one. A binding of an earlier
    /// attempt, or an annotation that does not parse (someone edited it), is none.
    pub fn binding(&self) -> Option<Binding> {
        self.annotated_binding()?
            .of_current_attempt(self.status.as_ref())
    }

    /// The binding annotation's, of whichever attempt.
    pub fn annotated_binding(&self) -> Option<Binding> {
        Binding::from_annotation(
            self.metadata
                .annotations
                .as_ref()?
                .get(BINDING_ANNOTATION)?,
        )
    }

    /// Where the agent's current attempt is placed: what its status says, else its binding.
    pub fn placement(&self) -> Option<Binding> {
        Binding::placement(self.status.as_ref(), self.annotated_binding().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(annotation: Option<&str>, restart_count: u32) -> FarAgent {
        let mut agent = FarAgent::new("a", crate::test_support::embedder_spec());
        if let Some(value) = annotation {
            agent.metadata.annotations = Some(
                [(BINDING_ANNOTATION.to_owned(), value.to_owned())]
                    .into_iter()
                    .collect(),
            );
        }
        agent.status = Some(FarAgentStatus {
            restart_count,
            ..FarAgentStatus::default()
        });
        agent
    }

    #[test]
    fn only_the_current_attempts_binding_counts() {
        let binding = Binding {
            attempt: 1,
            host: "blade-1".into(),
            vm: VmSize {
                vcpu: 2,
                memory_mib: 512,
            },
            claimed: None,
        };
        let value = binding.to_annotation();
        assert_eq!(
            value,
            r#"{"attempt":1,"host":"blade-1","vm":{"vcpu":2,"memoryMiB":512}}"#
        );
        assert_eq!(agent(Some(&value), 1).binding(), Some(binding));
        assert_eq!(
            agent(Some(&value), 2).binding(),
            None,
            "an earlier attempt's"
        );
        assert_eq!(agent(None, 0).binding(), None);
        assert_eq!(agent(Some("blade-1"), 0).binding(), None, "edited by hand");
    }
}
