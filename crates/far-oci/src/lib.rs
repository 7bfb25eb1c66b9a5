//! OCI images for microVM hosts.
//!
//! - [`registry`]: which registry serves a reference (mirrors) and over which scheme.
//! - [`store`]: pulled images cached by manifest digest; their files and ext4 volumes.
//! - [`unpack`]: applies layers to a directory under strict safety rules.
//! - [`ext4`]: a filesystem image from a directory, with `mkfs.ext4 -d`.
//! - [`push`]: a directory published as a single-layer image.

pub mod ext4;
pub mod push;
pub mod registry;
pub mod store;
pub mod unpack;

pub use registry::RegistryConfig;
pub use store::{ImageStore, Resolved};
pub use unpack::Limits;

/// Why an image could not be had.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The reference does not parse.
    #[error("image {reference:?} is not a valid OCI reference: {reason}")]
    BadReference {
        /// As given.
        reference: String,
        /// What the parser said.
        reason: String,
    },
    /// The registry cannot be reached.
    #[error("registry {registry} is unreachable: {reason}")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// The network's answer.
        reason: String,
    },
    /// The registry has no such image.
    #[error("image {image} not found in its registry")]
    NotFound {
        /// The reference, as sent to the registry.
        image: String,
    },
    /// The registry refused access.
    #[error("registry refused access to {image}: {reason}")]
    Denied {
        /// The reference.
        image: String,
        /// The registry's answer.
        reason: String,
    },
    /// Any other registry failure, including a blob that does not match its digest.
    #[error("pulling {image}: {reason}")]
    Registry {
        /// The reference.
        image: String,
        /// What went wrong.
        reason: String,
    },
    /// A layer far-host cannot unpack.
    #[error(
        "image {image} has a layer of type {media_type}, which far-host cannot unpack (use tar or tar+gzip layers)"
    )]
    UnsupportedLayer {
        /// The reference.
        image: String,
        /// The layer's media type.
        media_type: String,
    },
    /// Beyond a bound.
    #[error("image {image}: {what} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The reference.
        image: String,
        /// What.
        what: String,
        /// The bound.
        limit: u64,
    },
    /// The image has no such file.
    #[error("image {image} has no file {filename:?}")]
    MissingFile {
        /// The reference.
        image: String,
        /// The path asked for.
        filename: String,
    },
    /// A layer was refused.
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    /// mkfs.ext4 failed.
    #[error("building the ext4 volume: {reason}")]
    Mkfs {
        /// What mkfs.ext4 said.
        reason: String,
    },
    /// The disk failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let context = context.into();
    move |source| OciError::Io { context, source }
}
