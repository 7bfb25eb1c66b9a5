//! Per-agent tokens: an HMAC of the agent's UID under the channel's key, so the channel needs
//! no table of tokens (it survives restarts) and one agent's token is worthless for another.
//! Two kinds, each signed under its own domain so neither is ever valid as the other: the
//! agent's token, and the enrolment token its run configuration carries (see
//! [`far_agent_protocol::paths::ENROL`]).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// What is signed, so a token for one purpose is never valid for another.
const AGENT: &[u8] = b"far-agent-token/v1:";
const ENROLMENT: &[u8] = b"far-agent-enrolment/v1:";

/// The key tokens are derived from. `Debug` never prints it.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

/// A key shorter than this is refused.
pub const MIN_KEY_BYTES: usize = 32;

/// A key too short to be safe.
#[derive(Debug, thiserror::Error)]
#[error("the channel key must be at least {MIN_KEY_BYTES} bytes, got {0}")]
pub struct WeakKey(pub usize);

impl TokenKey {
    /// A key from secret bytes.
    ///
    /// # Errors
    /// [`WeakKey`] when shorter than [`MIN_KEY_BYTES`].
    pub fn new(bytes: Vec<u8>) -> Result<Self, WeakKey> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(WeakKey(bytes.len()));
        }
        Ok(Self(bytes))
    }

    fn mac(&self, domain: &[u8], uid: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        mac.update(domain);
        mac.update(uid.as_bytes());
        mac
    }

    fn sign(&self, domain: &[u8], uid: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(domain, uid).finalize().into_bytes())
    }

    /// Compared in constant time.
    fn check(&self, domain: &[u8], uid: &str, token: &str) -> bool {
        match URL_SAFE_NO_PAD.decode(token) {
            Ok(bytes) => self.mac(domain, uid).verify_slice(&bytes).is_ok(),
            Err(_) => false,
        }
    }

    /// The token of the agent with this UID.
    pub fn token_for(&self, uid: &str) -> String {
        self.sign(AGENT, uid)
    }

    /// Whether `token` is this agent's.
    pub fn verify(&self, uid: &str, token: &str) -> bool {
        self.check(AGENT, uid, token)
    }

    /// The enrolment token of the agent with this UID.
    pub fn enrolment_token_for(&self, uid: &str) -> String {
        self.sign(ENROLMENT, uid)
    }

    /// Whether `token` is this agent's enrolment token.
    pub fn verify_enrolment(&self, uid: &str, token: &str) -> bool {
        self.check(ENROLMENT, uid, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_valid_only_for_its_own_agent_and_key() {
        let key = TokenKey::new(vec![7; 32]).unwrap();
        let token = key.token_for("uid-a");
        assert!(key.verify("uid-a", &token));
        assert!(!key.verify("uid-b", &token));
        assert!(!TokenKey::new(vec![8; 32]).unwrap().verify("uid-a", &token));
        assert!(!key.verify("uid-a", "not base64!"));
        assert!(!format!("{key:?}").contains('7'));
        assert!(TokenKey::new(vec![1; 16]).is_err());
    }

    #[test]
    fn an_enrolment_token_is_never_an_agent_token_nor_the_reverse() {
        let key = TokenKey::new(vec![7; 32]).unwrap();
        let enrolment = key.enrolment_token_for("uid-a");
        assert!(key.verify_enrolment("uid-a", &enrolment));
        assert!(!key.verify("uid-a", &enrolment));
        assert!(!key.verify_enrolment("uid-a", &key.token_for("uid-a")));
        assert!(!key.verify_enrolment("uid-b", &enrolment));
    }
}
