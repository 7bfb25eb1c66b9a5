//! far-host: a Flintlock-compatible microVM host for one machine.
//!
//! Production runs upstream flintlockd with Firecracker; far-host speaks the same gRPC API
//! (FAR's own protos) for a laptop, one box, CI and benchmarks. Layout:
//! - [`service`]: the gRPC transport, errors reported as upstream reports them;
//! - [`host`]: VM records and their state machine (PENDING -> CREATED | FAILED, DELETING -> gone);
//! - [`store`]: records on disk, written atomically, adopted again after a restart;
//! - [`validate`]: what a spec must hold, with upstream's defaults;
//! - [`provider`]: what runs VMs (`qemu` microVMs, `sim` plays the guest for scale tests);
//! - [`images`]: where the files an image reference names are found;
//! - [`cli`]: the server's flags and main loop (`far-host` and `far host`).

pub mod cli;
pub mod host;
pub mod images;
pub mod provider;
pub mod record;
pub mod service;
pub mod store;
pub mod validate;

pub use host::{Host, HostConfig, HostError};
pub use service::{Service, routes, serve_on_loopback};
