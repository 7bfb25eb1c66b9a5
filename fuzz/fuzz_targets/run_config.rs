//! far-init's run configuration, as read from the metadata service: any bytes are refused or
//! accepted without a panic, and what is accepted encodes back to the same configuration.
#![no_main]

use far_agent_protocol::RunConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = RunConfig::parse(data) {
        let again = RunConfig::parse(&config.to_bytes()).expect("an accepted config re-parses");
        assert_eq!(again.to_bytes(), config.to_bytes());
    }
});
