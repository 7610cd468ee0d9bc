//! `spike keeper` configuration from the environment.

use std::net::SocketAddr;

use crate::identity::IdentityConfig;
use crate::platform::env::{Result, Source, listen_addr, optional_listen_addr};
use crate::transport::Limits;

/// `SPIKE_KEEPER_TLS_PORT` when unset.
pub const DEFAULT_KEEPER_ADDR: &str = ":8443";

/// `spike keeper` configuration.
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// `SPIKE_KEEPER_TLS_PORT`: where the Keeper listens.
    pub listen: SocketAddr,
    /// Trust domains and this Keeper's SVID source.
    pub identity: IdentityConfig,
    /// Connection limits and timeouts of the HTTPS server.
    pub server: Limits,
    /// `SPIKE_KEEPER_METRICS_ADDR`: where Prometheus metrics are served (plain HTTP); unset, no
    /// metrics listener.
    pub metrics: Option<SocketAddr>,
}

impl KeeperConfig {
    /// Reads `SPIKE_KEEPER_*`, the identity and the server limits.
    pub fn from_source(env: &impl Source) -> Result<KeeperConfig> {
        Ok(KeeperConfig {
            server: Limits::from_source(env)?,
            listen: listen_addr(env, "SPIKE_KEEPER_TLS_PORT", DEFAULT_KEEPER_ADDR)?,
            identity: IdentityConfig::from_source(env)?,
            metrics: optional_listen_addr(env, "SPIKE_KEEPER_METRICS_ADDR")?,
        })
    }
}
