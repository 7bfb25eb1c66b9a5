//! Flintlock's microVM gRPC API (`microvm.services.api.v1alpha1`, `flintlock.types`), compiled
//! from FAR's own `.proto` files, with the conventions a client of a real flintlockd must follow:
//! how errors are reported ([`errors`]) and how the shared token is sent ([`auth`]); and
//! far-host's own extension service ([`far_host`]).

pub mod auth;
pub mod errors;
pub mod listing;

/// The proto packages, nested as their names are so generated cross-package paths resolve.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod packages {
    pub mod far {
        pub mod host {
            pub mod v1 {
                tonic::include_proto!("far.host.v1");
            }
        }
        pub mod listing {
            pub mod v1 {
                tonic::include_proto!("far.listing.v1");
            }
        }
    }
    pub mod flintlock {
        pub mod types {
            tonic::include_proto!("flintlock.types");
        }
    }
    pub mod microvm {
        pub mod services {
            pub mod api {
                pub mod v1alpha1 {
                    tonic::include_proto!("microvm.services.api.v1alpha1");
                }
            }
        }
    }
}

/// `flintlock.types`: the microVM, its spec and status.
pub use packages::flintlock::types;
/// `microvm.services.api.v1alpha1`: the MicroVM service, its client and server.
pub use packages::microvm::services::api::v1alpha1;

/// `far.host.v1`: far-host's extension (guests that ended, and why), in its own package so the
/// upstream contract stays intact. Upstream flintlockd answers it UNIMPLEMENTED.
pub use packages::far::host::v1 as far_host;

pub use v1alpha1::micro_vm_client::MicroVmClient;
pub use v1alpha1::micro_vm_server::{MicroVm, MicroVmServer};
