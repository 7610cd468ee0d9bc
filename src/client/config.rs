//! Client settings from the environment: which Nexus to call and how long to wait to connect.

use std::time::Duration;

use hyper::Uri;

use crate::platform::env::{Result, Source, duration, invalid, parse_https_url};

/// `SPIKE_NEXUS_API_URL` when unset.
pub const DEFAULT_API_URL: &str = "https://localhost:8553";

/// Default of `SPIKE_HTTP_CLIENT_DIALER_TIMEOUT`: short, because a client with several Nexus
/// addresses moves on to the next one when a connect times out.
pub const DEFAULT_DIALER_TIMEOUT: Duration = Duration::from_secs(1);

/// `SPIKE_HTTP_CLIENT_DIALER_TIMEOUT` (SPIKE's name): the TCP connect timeout of clients, per
/// address.
pub fn dialer_timeout(env: &impl Source) -> Result<Duration> {
    duration(
        env,
        "SPIKE_HTTP_CLIENT_DIALER_TIMEOUT",
        DEFAULT_DIALER_TIMEOUT,
    )
}

/// `SPIKE_NEXUS_API_URL`: one URL or a comma-separated list, for clients.
pub fn api_urls(env: &impl Source) -> Result<Vec<Uri>> {
    const VAR: &str = "SPIKE_NEXUS_API_URL";
    let text = env.get(VAR).unwrap_or_else(|| DEFAULT_API_URL.to_string());
    text.split(',')
        .map(|item| parse_https_url(item.trim()).map_err(|reason| invalid(VAR, reason)))
        .collect()
}
