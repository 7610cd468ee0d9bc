//! The process environment as configuration: where values come from ([`Source`]), the error that
//! names the variable, and the parsers every part uses for its own `SPIKE_*` variables.
//!
//! Each part reads its own variables (`nexus::NexusConfig`, `keeper::KeeperConfig`,
//! `store::Backend`, `identity::IdentityConfig`, `transport::Limits`, `client::config`); this
//! module holds only the shared machinery, so configuration never pulls one part into another.
//! Parsing takes a [`Source`] instead of reading the process environment directly, so tests can
//! feed it a map. Errors name the variable and say what is wrong in one line; values of
//! variables that may hold credentials are never echoed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hyper::Uri;

/// One configuration problem, named by its variable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A variable holds a value that cannot be used.
    #[error("{var}: {reason}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// What is wrong with its value (never the value itself when it may hold a secret).
        reason: String,
    },
    /// A required variable is unset or empty.
    #[error("{var} must be set: {hint}")]
    Missing {
        /// The variable.
        var: &'static str,
        /// What to set it to.
        hint: &'static str,
    },
    /// A part's own check failed (the SVID files could not be located, say); the message names
    /// the variable.
    #[error("{0}")]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// Result of configuration parsing.
pub type Result<T> = std::result::Result<T, Error>;

/// Where configuration values come from: the process environment in production, a map in tests.
///
/// Values may be credentials (a database URL, S3 secrets): parsers built on a `Source` never
/// echo a value into an error unless the variable cannot hold a secret.
pub trait Source {
    /// The value of `name`, or `None` when it is unset or empty.
    fn get(&self, name: &str) -> Option<String>;
}

/// The real process environment. Empty values count as unset, as SPIKE does.
pub struct ProcessEnv;

impl Source for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<S: std::hash::BuildHasher> Source for std::collections::HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<String> {
        std::collections::HashMap::get(self, name)
            .filter(|v| !v.trim().is_empty())
            .cloned()
    }
}

/// An [`Error::Invalid`] for `var`.
pub fn invalid(var: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        var,
        reason: reason.into(),
    }
}

/// `var` as a number, or `default` when unset.
pub fn number<T: std::str::FromStr>(env: &impl Source, var: &'static str, default: T) -> Result<T> {
    match env.get(var) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| invalid(var, format!("{v:?} is not a valid number in range"))),
    }
}

/// `var` as a positive duration ([`parse_duration`]), or `default` when unset.
pub fn duration(env: &impl Source, var: &'static str, default: Duration) -> Result<Duration> {
    match env.get(var) {
        None => Ok(default),
        Some(v) => match parse_duration(&v) {
            Some(d) if !d.is_zero() => Ok(d),
            _ => Err(invalid(
                var,
                format!("{v:?} is not a positive duration (examples: 5m, 30s, 500ms, 1h30m)"),
            )),
        },
    }
}

/// Parses Go-style durations as SPIKE writes them: `300ms`, `2s`, `5m`, `1h30m`.
/// A bare number is taken as seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.checked_mul(60)?),
            "h" => Duration::from_secs(value.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(unit)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// `:8553`, `8553`, `127.0.0.1:8553` or `[::1]:8553`.
pub fn listen_addr(env: &impl Source, var: &'static str, default: &str) -> Result<SocketAddr> {
    let text = env.get(var).unwrap_or_else(|| default.to_string());
    parse_listen_addr(&text).ok_or_else(|| {
        invalid(
            var,
            format!(
                "{text:?} is not a listen address (examples: :8553, 127.0.0.1:8553, [::1]:8553)"
            ),
        )
    })
}

/// An optional listen address (a listener that is off unless `var` is set), in the forms of
/// [`parse_listen_addr`].
pub fn optional_listen_addr(env: &impl Source, var: &'static str) -> Result<Option<SocketAddr>> {
    match env.get(var) {
        None => Ok(None),
        Some(text) => parse_listen_addr(&text).map(Some).ok_or_else(|| {
            invalid(
                var,
                format!(
                    "{text:?} is not a listen address (examples: 127.0.0.1:9553, :9553, [::1]:9553)"
                ),
            )
        }),
    }
}

/// Parses a listen address: `:8553` or `8553` (every interface), `127.0.0.1:8553`, `[::1]:8553`.
pub fn parse_listen_addr(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if let Some(port) = text
        .strip_prefix(':')
        .or(Some(text).filter(|t| !t.contains(':')))
    {
        let port: u16 = port.parse().ok()?;
        return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
    }
    text.parse().ok()
}

/// An `https://host[:port]` URL with nothing after the authority but an optional `/`.
pub fn parse_https_url(item: &str) -> std::result::Result<Uri, String> {
    let uri: Uri = item
        .parse()
        .map_err(|_| format!("{item:?} is not a URL (expected https://host:port)"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("{item:?} must start with https://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{item:?} has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{item:?} must not have a path or query"));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        for bad in ["", "m", "5x", "-1s", "1.5s", "s5"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen_addr(":8553").unwrap().port(), 8553);
        assert_eq!(parse_listen_addr("8553").unwrap().port(), 8553);
        assert_eq!(
            parse_listen_addr("127.0.0.1:9").unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(parse_listen_addr("[::1]:9").unwrap().is_ipv6());
        assert!(parse_listen_addr("localhost:x").is_none());
    }
}
