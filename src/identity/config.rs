//! Identity settings: the trust domain and where this process's SVID comes from.

use std::path::PathBuf;
use std::time::Duration;

use super::{SpiffeId, SvidPaths};
use crate::platform::env::{Error, Result, Source};

pub const DEFAULT_TRUST_DOMAIN: &str = "spike.ist";
/// How often servers look for rotated SVID files on disk.
pub const SVID_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// What every server process needs: who it is and which trust domain it serves.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// `SPIKE_TRUST_ROOT`: the only trust domain whose SVIDs are accepted.
    pub trust_domain: String,
    /// This process's SVID files (`SPIKE_SVID_DIR` and the single-file overrides).
    pub svid: SvidPaths,
}

impl IdentityConfig {
    pub fn from_source(env: &impl Source) -> Result<IdentityConfig> {
        let trust_domain = trust_domain(env)?;
        let path = |name| env.get(name).map(PathBuf::from);
        let svid = SvidPaths::resolve(
            path("SPIKE_SVID_DIR"),
            path("SPIKE_SVID_CERT"),
            path("SPIKE_SVID_KEY"),
            path("SPIKE_SVID_BUNDLE"),
        )
        .map_err(|e| Error::Other(Box::new(e)))?;
        Ok(IdentityConfig { trust_domain, svid })
    }
}

/// `SPIKE_TRUST_ROOT`, validated as a SPIFFE trust domain name.
pub fn trust_domain(env: &impl Source) -> Result<String> {
    let td = env
        .get("SPIKE_TRUST_ROOT")
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
    SpiffeId::parse(&format!("spiffe://{td}")).map_err(|e| Error::Invalid {
        var: "SPIKE_TRUST_ROOT",
        reason: format!("{td:?} is not a valid trust domain ({e})"),
    })?;
    Ok(td)
}
