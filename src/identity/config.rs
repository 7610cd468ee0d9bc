//! Identity settings from the environment: the trust domains (`SPIKE_TRUST_ROOT*`) and where
//! this process's SVID comes from (`SPIFFE_ENDPOINT_SOCKET` or `SPIKE_SVID_*`, see
//! [`IdentityConfig`]), read through [`Source`] like every other part's settings.

use std::time::Duration;

use super::{DEFAULT_FIRST_SVID_TIMEOUT, IdentityConfig, SOURCE_TIMEOUT, TrustRoots};
use crate::platform::env::{Error, Result, Source, duration};

/// How often servers look for rotated SVID files on disk.
pub const SVID_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

impl IdentityConfig {
    /// Reads the identity settings; `SPIKE_SPIFFE_SOURCE_TIMEOUT` bounds the wait for the
    /// Workload API's first SVID.
    pub fn from_source(env: &impl Source) -> Result<IdentityConfig> {
        let mut config = IdentityConfig::from_lookup(&|name| env.get(name))
            .map_err(|e| Error::Other(Box::new(e)))?;
        config.set_first_svid_timeout(duration(env, SOURCE_TIMEOUT, DEFAULT_FIRST_SVID_TIMEOUT)?);
        Ok(config)
    }

    /// The first `SPIKE_TRUST_ROOT` entry: the trust domain this process belongs to.
    pub fn trust_domain(&self) -> &str {
        self.trust.primary()
    }
}

/// The first `SPIKE_TRUST_ROOT` entry, the whole list validated as trust domain names.
pub fn trust_domain(env: &impl Source) -> Result<String> {
    Ok(TrustRoots::from_lookup(&|name| env.get(name))
        .map_err(|e| Error::Other(Box::new(e)))?
        .primary()
        .to_string())
}
