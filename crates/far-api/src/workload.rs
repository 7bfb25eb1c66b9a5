//! What an agent runs and in what VM, once its pool's template is applied: the one rule for
//! combining a FarAgent with the FarAgentPool it names.
//!
//! - The VM's shape (image, memory, cpu, volumes, kernel, hostSelector) is the pool's: an agent
//!   leaves it out or says the same. A claimed VM is already booted and cannot be reshaped, so a
//!   different value is refused, naming the field.
//! - The task (entrypoint, args) is the agent's where it gives one, the template's otherwise.
//! - env and secretFiles are the template's, overridden entry by entry (by name, by mountPath)
//!   by the agent's.

use std::collections::BTreeMap;

use crate::quantity::Memory;
use crate::{EnvVar, ImageVolume, KernelOverride, SecretFile, Workload};

/// A complete workload: every field a VM and its task need, decided.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedWorkload {
    /// OCI image of the root volume.
    pub image: String,
    /// Memory quantity, as written (`512Mi`).
    pub memory: String,
    /// Virtual CPUs.
    pub cpu: u32,
    /// The agent's program.
    pub entrypoint: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment.
    pub env: Vec<EnvVar>,
    /// Secrets written as files.
    pub secret_files: Vec<SecretFile>,
    /// Read-only image volumes.
    pub volumes: Vec<ImageVolume>,
    /// A kernel other than the default.
    pub kernel: Option<KernelOverride>,
    /// Labels a host must carry.
    pub host_selector: BTreeMap<String, String>,
}

/// Why a FarAgent's workload cannot be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadError {
    /// Neither the agent nor a pool gives the field (admission normally stops this).
    #[error("spec.{0} is not set, and no pool's template supplies it: set spec.{0}")]
    Missing(&'static str),
    /// The agent asks for a VM shape other than its pool's.
    #[error(
        "spec.{field} is {agent} but pool {pool:?} boots its VMs with {template}: a claimed VM cannot be reshaped; leave spec.{field} out or make it the pool's"
    )]
    Mismatch {
        /// The field, under `spec`.
        field: &'static str,
        /// The pool's name.
        pool: String,
        /// The agent's value, as text.
        agent: String,
        /// The template's value, as text.
        template: String,
    },
}

/// A named FarAgentPool's template, as [`resolve`] reads it.
#[derive(Clone, Copy, Debug)]
pub struct Template<'a> {
    /// The pool's name, for messages.
    pub pool: &'a str,
    /// Its `spec.template`.
    pub workload: &'a Workload,
}

/// The workload of an agent declaring `own`, claiming from `template`'s pool if any.
///
/// # Errors
/// [`WorkloadError::Mismatch`] when the agent reshapes the pool's VM, [`WorkloadError::Missing`]
/// when a required field is set nowhere.
pub fn resolve(
    own: &Workload,
    template: Option<Template<'_>>,
) -> Result<ResolvedWorkload, WorkloadError> {
    let empty = Workload::default();
    let (pool, t) = template.map_or(("", &empty), |t| (t.pool, t.workload));
    let mismatch = |field, agent: String, template: String| WorkloadError::Mismatch {
        field,
        pool: pool.to_owned(),
        agent,
        template,
    };
    // One rule for every field of the VM's shape: unset takes the template's; set must equal it.
    fn shape<T: Clone>(
        own: Option<&T>,
        theirs: Option<&T>,
        same: impl Fn(&T, &T) -> bool,
        differ: impl FnOnce(&T, &T) -> WorkloadError,
    ) -> Result<Option<T>, WorkloadError> {
        match (own, theirs) {
            (Some(a), Some(b)) if !same(a, b) => Err(differ(a, b)),
            (Some(a), _) => Ok(Some(a.clone())),
            (None, b) => Ok(b.cloned()),
        }
    }

    let image = shape(
        own.image.as_ref(),
        t.image.as_ref(),
        |a, b| a == b,
        |a, b| mismatch("image", a.clone(), b.clone()),
    )?
    .ok_or(WorkloadError::Missing("image"))?;
    let memory = shape(
        own.memory.as_ref(),
        t.memory.as_ref(),
        // 512Mi and 0.5Gi are the same VM; text that does not parse is compared as text (sizing
        // refuses it later with its own message).
        |a, b| a == b || matches!((Memory::parse(a), Memory::parse(b)), (Ok(x), Ok(y)) if x == y),
        |a, b| mismatch("memory", a.clone(), b.clone()),
    )?
    .ok_or(WorkloadError::Missing("memory"))?;
    let cpu = shape(
        own.cpu.as_ref(),
        t.cpu.as_ref(),
        |a, b| a == b,
        |a, b| mismatch("cpu", a.to_string(), b.to_string()),
    )?
    .ok_or(WorkloadError::Missing("cpu"))?;
    let volumes = shape(
        (!own.volumes.is_empty()).then_some(&own.volumes),
        (!t.volumes.is_empty()).then_some(&t.volumes),
        |a, b| a == b,
        |a, b| mismatch("volumes", names(a), names(b)),
    )?
    .unwrap_or_default();
    let kernel = shape(
        own.kernel.as_ref(),
        t.kernel.as_ref(),
        |a, b| a == b,
        |a, b| mismatch("kernel", a.image.clone(), b.image.clone()),
    )?;
    let host_selector = shape(
        (!own.host_selector.is_empty()).then_some(&own.host_selector),
        (!t.host_selector.is_empty()).then_some(&t.host_selector),
        |a, b| a == b,
        |a, b| mismatch("hostSelector", labels(a), labels(b)),
    )?
    .unwrap_or_default();

    let entrypoint = own
        .entrypoint
        .clone()
        .or_else(|| t.entrypoint.clone())
        .ok_or(WorkloadError::Missing("entrypoint"))?;
    let args = if own.args.is_empty() {
        t.args.clone()
    } else {
        own.args.clone()
    };
    Ok(ResolvedWorkload {
        image,
        memory,
        cpu,
        entrypoint,
        args,
        env: overlay(&t.env, &own.env, |v| &v.name),
        secret_files: overlay(&t.secret_files, &own.secret_files, |f| &f.mount_path),
        volumes,
        kernel,
        host_selector,
    })
}

/// `base` with each entry of `over` replacing the one of the same key, or appended.
/// What a pool's idle VMs are booted as: the template's VM (image, memory, cpu, volumes, kernel,
/// host selector) with no task, which comes with each claim.
///
/// # Errors
/// [`WorkloadError::Missing`] when the template lacks image, memory or cpu (the CRD's rules
/// refuse such a pool).
pub fn pool_vm(template: &Workload) -> Result<ResolvedWorkload, WorkloadError> {
    let vm = Workload {
        entrypoint: Some(String::new()),
        args: Vec::new(),
        env: Vec::new(),
        secret_files: Vec::new(),
        ..template.clone()
    };
    resolve(&vm, None)
}

fn overlay<T: Clone>(base: &[T], over: &[T], key: impl Fn(&T) -> &String) -> Vec<T> {
    let mut out: Vec<T> = base
        .iter()
        .filter(|b| !over.iter().any(|o| key(o) == key(b)))
        .cloned()
        .collect();
    out.extend(over.iter().cloned());
    out
}

fn names(volumes: &[ImageVolume]) -> String {
    let names: Vec<String> = volumes
        .iter()
        .map(|v| format!("{}={}@{}", v.name, v.image, v.mount_path))
        .collect();
    format!("[{}]", names.join(", "))
}

fn labels(selector: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{{{}}}", pairs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn template() -> Workload {
        Workload {
            image: Some("ghcr.io/microscaler/tiffany-vm:v0.3.1".into()),
            memory: Some("512Mi".into()),
            cpu: Some(1),
            entrypoint: Some("/usr/local/bin/tiffany".into()),
            args: vec!["--idle".into()],
            env: vec![var("A", "pool"), var("B", "pool")],
            ..Workload::default()
        }
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn pool(w: &Workload) -> Option<Template<'_>> {
        Some(Template {
            pool: "warm",
            workload: w,
        })
    }

    #[test]
    fn an_agent_that_says_nothing_gets_the_template() {
        let t = template();
        let r = resolve(&Workload::default(), pool(&t)).unwrap();
        assert_eq!(r.image, "ghcr.io/microscaler/tiffany-vm:v0.3.1");
        assert_eq!((r.memory.as_str(), r.cpu), ("512Mi", 1));
        assert_eq!(r.entrypoint, "/usr/local/bin/tiffany");
        assert_eq!(r.args, ["--idle"]);
        assert_eq!(r.env, [var("A", "pool"), var("B", "pool")]);
    }

    #[test]
    fn the_agent_gives_the_task_and_overrides_env_by_name() {
        let t = template();
        let own = Workload {
            entrypoint: Some("/bin/task".into()),
            args: vec!["--go".into()],
            env: vec![var("B", "agent"), var("C", "agent")],
            ..Workload::default()
        };
        let r = resolve(&own, pool(&t)).unwrap();
        assert_eq!(r.entrypoint, "/bin/task");
        assert_eq!(r.args, ["--go"]);
        assert_eq!(
            r.env,
            [var("A", "pool"), var("B", "agent"), var("C", "agent")]
        );
    }

    #[test]
    fn the_same_memory_written_differently_is_the_same_vm() {
        let t = template();
        let own = Workload {
            memory: Some("1Gi".into()),
            ..Workload::default()
        };
        assert!(matches!(
            resolve(&own, pool(&t)),
            Err(WorkloadError::Mismatch {
                field: "memory",
                ..
            })
        ));
        let own = Workload {
            memory: Some("524288Ki".into()),
            ..Workload::default()
        };
        assert_eq!(resolve(&own, pool(&t)).unwrap().memory, "524288Ki");
    }

    #[test]
    fn a_different_shape_is_refused_naming_the_field_and_both_values() {
        let t = template();
        let own = Workload {
            cpu: Some(2),
            ..Workload::default()
        };
        let e = resolve(&own, pool(&t)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.cpu is 2 but pool \"warm\" boots its VMs with 1: a claimed VM cannot be reshaped; leave spec.cpu out or make it the pool's"
        );
    }

    #[test]
    fn without_a_pool_every_required_field_must_be_the_agents() {
        let own = Workload {
            image: Some("busybox:1".into()),
            memory: Some("256Mi".into()),
            cpu: Some(1),
            ..Workload::default()
        };
        assert_eq!(
            resolve(&own, None),
            Err(WorkloadError::Missing("entrypoint"))
        );
    }

    fn shape_field() -> impl Strategy<Value = u8> {
        0u8..6
    }

    proptest! {
        /// Whatever the agent leaves out of the VM's shape, the resolved VM is the template's;
        /// whatever it sets differently is refused: a claim never silently changes a VM.
        #[test]
        fn a_resolved_vm_is_always_the_pools_shape(
            set in proptest::collection::vec((shape_field(), any::<bool>()), 0..6),
        ) {
            let t = Workload {
                volumes: vec![ImageVolume { name: "m".into(), image: "models:1".into(), mount_path: "/m".into() }],
                host_selector: [("zone".to_owned(), "a".to_owned())].into(),
                kernel: Some(KernelOverride { image: "k:1".into(), filename: "vmlinux".into(), cmdline: BTreeMap::new() }),
                ..template()
            };
            let mut own = Workload::default();
            let mut differs = false;
            for (field, same) in set {
                // An empty volume list is "left out", not a different shape.
                differs |= !same && field != 3;
                match field {
                    0 => own.image = Some(if same { t.image.clone().unwrap() } else { "other:1".into() }),
                    1 => own.memory = Some(if same { "512Mi".into() } else { "1Gi".into() }),
                    2 => own.cpu = Some(if same { 1 } else { 2 }),
                    3 => own.volumes = if same { t.volumes.clone() } else { vec![] },
                    4 => own.host_selector = if same { t.host_selector.clone() } else { [("zone".to_owned(), "b".to_owned())].into() },
                    _ => own.kernel = if same { t.kernel.clone() } else { Some(KernelOverride { image: "k:2".into(), filename: "vmlinux".into(), cmdline: BTreeMap::new() }) },
                }
            }
            match resolve(&own, pool(&t)) {
                Ok(r) => {
                    prop_assert_eq!(&r.image, t.image.as_ref().unwrap());
                    prop_assert_eq!(Memory::parse(&r.memory).unwrap(), Memory::parse("512Mi").unwrap());
                    prop_assert_eq!(r.cpu, 1);
                    prop_assert_eq!(&r.volumes, &t.volumes);
                    prop_assert_eq!(&r.host_selector, &t.host_selector);
                    prop_assert_eq!(&r.kernel, &t.kernel);
                }
                Err(WorkloadError::Mismatch { .. }) => prop_assert!(differs),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
