//! Flintlock's shared-token authentication: metadata `authorization: basic <base64(token)>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::{Request, Status};

/// The metadata key flintlockd reads the token from.
pub const AUTHORIZATION: &str = "authorization";

/// A client interceptor that sends a host's shared token with every call.
///
/// `Debug` never prints the token.
#[derive(Clone)]
pub struct BasicToken {
    header: AsciiMetadataValue,
}

impl std::fmt::Debug for BasicToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BasicToken(<redacted>)")
    }
}

impl BasicToken {
    /// Prepares the header for `token`.
    ///
    /// # Errors
    /// Never in practice: base64 output is always a valid header value.
    pub fn new(token: &str) -> Result<Self, Status> {
        let value = format!("basic {}", STANDARD.encode(token));
        let header = value
            .parse()
            .map_err(|_| Status::internal("token does not encode as a header"))?;
        Ok(Self { header })
    }
}

impl tonic::service::Interceptor for BasicToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.header.clone());
        Ok(request)
    }
}

/// Checks a request's token the way flintlockd does.
///
/// # Errors
/// `Unauthenticated` when the header is missing, malformed, or holds another token; the
/// message never contains either token.
pub fn check_basic_token(metadata: &MetadataMap, expected: &str) -> Result<(), Status> {
    let refused = || Status::unauthenticated("invalid or missing authorization token");
    let header = metadata.get(AUTHORIZATION).ok_or_else(refused)?;
    let header = header.to_str().map_err(|_| refused())?;
    let (scheme, encoded) = header.split_once(' ').ok_or_else(refused)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(refused());
    }
    let given = STANDARD.decode(encoded.trim()).map_err(|_| refused())?;
    if constant_time_eq(&given, expected.as_bytes()) {
        Ok(())
    } else {
        Err(refused())
    }
}

/// Compares without an early exit, so the time taken does not reveal how much matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn the_interceptor_sends_what_the_check_accepts() {
        let mut token = BasicToken::new("s3cret").unwrap();
        let request = token.call(Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get(AUTHORIZATION).unwrap(),
            "basic czNjcmV0"
        );
        assert!(check_basic_token(request.metadata(), "s3cret").is_ok());
        let err = check_basic_token(request.metadata(), "other").unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(!err.message().contains("s3cret") && !err.message().contains("other"));
        assert!(!format!("{token:?}").contains("czNjcmV0"));
    }

    #[test]
    fn missing_or_malformed_headers_are_refused() {
        let mut metadata = MetadataMap::new();
        assert!(check_basic_token(&metadata, "t").is_err());
        metadata.insert(AUTHORIZATION, "bearer dA==".parse().unwrap());
        assert!(check_basic_token(&metadata, "t").is_err());
        metadata.insert(AUTHORIZATION, "basic !!!".parse().unwrap());
        assert!(check_basic_token(&metadata, "t").is_err());
        metadata.insert(AUTHORIZATION, "basic dA==".parse().unwrap());
        assert!(check_basic_token(&metadata, "t").is_ok());
    }
}
