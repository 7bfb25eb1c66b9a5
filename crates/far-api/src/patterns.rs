//! Regular expressions that the CRD schemas carry as `pattern`. Kubernetes evaluates them with
//! Go's RE2 and the in-repo admission check with the `regex` crate: both read this syntax the
//! same way (no look-around, no back-references).

/// An OCI image reference: `[registry[:port]/]repository[:tag][@sha256:digest]`.
pub const IMAGE_REFERENCE: &str = r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$";

/// A Kubernetes memory quantity in whole units: bytes, or a binary or decimal suffix.
pub const MEMORY_QUANTITY: &str = r"^[1-9][0-9]{0,15}(Ki|Mi|Gi|Ti|k|M|G|T)?$";

/// An environment variable name, as Kubernetes accepts it for Pods.
pub const ENV_NAME: &str = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$";

/// A Secret or ConfigMap key.
pub const CONFIG_KEY: &str = r"^[-._a-zA-Z0-9]+$";

/// An RFC 1123 subdomain: the name of most Kubernetes objects.
pub const DNS_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// An RFC 1123 label: a namespace name.
pub const DNS_LABEL: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A Flintlock volume id.
pub const VOLUME_NAME: &str = r"^[a-z][a-z0-9_]*$";

/// A relative file path inside an image, without `..` components.
pub const RELATIVE_FILE: &str = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$";

/// An http or https gRPC endpoint with a host and port.
pub const ENDPOINT: &str =
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})$|^https?://\[[0-9a-fA-F:]+\](:[0-9]{1,5})$";

/// A Flintlock provider name.
pub const PROVIDER: &str = r"^[a-z][a-z0-9-]*$";

/// A Linux network interface name (at most 15 bytes).
pub const BRIDGE_NAME: &str = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$";

/// A dotted-quad IPv4 address.
pub const IPV4: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$";

/// An IPv4 address with a prefix length.
pub const IPV4_CIDR: &str = r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/([0-9]|[12][0-9]|3[0-2])$";
