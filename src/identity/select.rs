//! Which identity source the environment asks for, and the trust domains.
//!
//! - `SPIFFE_ENDPOINT_SOCKET` (SPIKE's name; `unix:///path` or `unix:/path`)
//!   selects the SPIFFE Workload API.
//! - `SPIKE_SVID_DIR` and/or `SPIKE_SVID_CERT`, `SPIKE_SVID_KEY`,
//!   `SPIKE_SVID_BUNDLE` select SVID files (DESIGN.md §2).
//! - Both at once is refused, naming both variables: SPIKE itself only knows
//!   the Workload API, and silently preferring one would let a stale
//!   `SPIKE_SVID_DIR` or a globally exported `SPIFFE_ENDPOINT_SOCKET` decide
//!   which identity a server presents.
//! - Neither takes SPIRE's default socket,
//!   `unix:///tmp/spire-agent/public/api.sock`, as SPIKE does, so `spike`
//!   drops into an existing SPIRE deployment unconfigured. If nothing is at
//!   that path the process stops at once with a message naming both
//!   variables (it does not wait for an agent nobody said to expect).
//!
//! Unlike SPIKE, which reads the environment wherever it needs a value, the
//! lookup is a parameter, so `config.rs` can feed it its own source.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::svid::{SvidPaths, SvidSource};
use super::trust::TrustRoots;
use super::workload::{ENDPOINT_SOCKET, WorkloadApiConfig};
use super::{Error, Result};

const SVID_VARS: [&str; 4] = [
    "SPIKE_SVID_DIR",
    "SPIKE_SVID_CERT",
    "SPIKE_SVID_KEY",
    "SPIKE_SVID_BUNDLE",
];

/// Where this process's SVID comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceConfig {
    /// SVID files, re-read when they change.
    Files(SvidPaths),
    /// The SPIFFE Workload API.
    WorkloadApi(WorkloadApiConfig),
}

/// Everything identity-related a process reads from its environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The `SPIKE_TRUST_ROOT*` lists.
    pub trust: TrustRoots,
    /// This process's SVID source.
    pub source: SourceConfig,
}

impl IdentityConfig {
    /// Reads `SPIFFE_ENDPOINT_SOCKET`, `SPIKE_SVID_*` and `SPIKE_TRUST_ROOT*`
    /// through `get`, which returns `None` for unset or empty variables.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<IdentityConfig> {
        let trust = TrustRoots::from_lookup(get)?;
        let files_var = SVID_VARS.into_iter().find(|v| get(v).is_some());
        let source = match (get(ENDPOINT_SOCKET), files_var) {
            (Some(_), Some(files_var)) => return Err(Error::BothIdentitySources { files_var }),
            (None, None) => SourceConfig::WorkloadApi(WorkloadApiConfig::spire_default()),
            (Some(endpoint), None) => {
                SourceConfig::WorkloadApi(WorkloadApiConfig::parse(&endpoint)?)
            }
            (None, Some(_)) => {
                let path = |name: &str| get(name).map(PathBuf::from);
                SourceConfig::Files(SvidPaths::resolve(
                    path(SVID_VARS[0]),
                    path(SVID_VARS[1]),
                    path(SVID_VARS[2]),
                    path(SVID_VARS[3]),
                )?)
            }
        };
        Ok(IdentityConfig { trust, source })
    }

    /// Sets how long [`open`](Self::open) waits for the Workload API's first
    /// SVID (`SPIKE_SPIFFE_SOURCE_TIMEOUT`); no effect for files.
    pub fn set_first_svid_timeout(&mut self, timeout: Duration) {
        if let SourceConfig::WorkloadApi(c) = &mut self.source {
            c.first_svid_timeout = timeout;
        }
    }

    /// The SVID files, if that is the source.
    pub fn svid_paths(&self) -> Option<&SvidPaths> {
        match &self.source {
            SourceConfig::Files(p) => Some(p),
            SourceConfig::WorkloadApi(_) => None,
        }
    }

    /// Opens the configured source: loads the files, or waits (bounded, with
    /// logged retries) for the Workload API's first SVID. Must run inside a
    /// tokio runtime. For the Workload API, errors for which
    /// [`Error::is_agent_unavailable`] is true mean "no SVID from the agent".
    pub async fn open(&self) -> Result<Arc<SvidSource>> {
        match &self.source {
            SourceConfig::Files(paths) => SvidSource::load(paths.clone()),
            SourceConfig::WorkloadApi(c) => {
                SvidSource::workload_api(c.clone(), self.trust.clone()).await
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<IdentityConfig> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        IdentityConfig::from_lookup(&|n| map.get(n).cloned())
    }

    #[test]
    fn socket_selects_the_workload_api() {
        for value in [
            "unix:///tmp/spire-agent/public/api.sock",
            "unix:/tmp/spire-agent/public/api.sock",
        ] {
            let c = cfg(&[(ENDPOINT_SOCKET, value)]).unwrap();
            let SourceConfig::WorkloadApi(w) = &c.source else {
                panic!("{c:?}");
            };
            assert_eq!(w.socket, PathBuf::from("/tmp/spire-agent/public/api.sock"));
            assert_eq!(w.endpoint, value);
            assert_eq!(w.first_svid_timeout, Duration::from_secs(30));
            assert_eq!(c.trust, TrustRoots::single("spike.ist").unwrap());
            assert!(c.svid_paths().is_none());
        }
        let mut c = cfg(&[(ENDPOINT_SOCKET, "unix:///s")]).unwrap();
        c.set_first_svid_timeout(Duration::from_secs(2));
        let SourceConfig::WorkloadApi(w) = &c.source else {
            panic!()
        };
        assert_eq!(w.first_svid_timeout, Duration::from_secs(2));
    }

    #[test]
    fn svid_variables_select_files() {
        let c = cfg(&[("SPIKE_SVID_DIR", "/etc/spike/svid")]).unwrap();
        let p = c.svid_paths().unwrap();
        assert_eq!(p.cert, PathBuf::from("/etc/spike/svid/svid.pem"));
        let c = cfg(&[
            ("SPIKE_SVID_CERT", "/c"),
            ("SPIKE_SVID_KEY", "/k"),
            ("SPIKE_SVID_BUNDLE", "/b"),
        ])
        .unwrap();
        assert_eq!(c.svid_paths().unwrap().key, PathBuf::from("/k"));
        let e = cfg(&[("SPIKE_SVID_CERT", "/c")]).unwrap_err().to_string();
        assert!(
            e.contains("SPIKE_SVID_KEY") || e.contains("SPIKE_SVID_DIR"),
            "{e}"
        );
    }

    #[test]
    fn both_is_refused() {
        for files_var in SVID_VARS {
            let e = cfg(&[(ENDPOINT_SOCKET, "unix:///s"), (files_var, "/x")])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("SPIFFE_ENDPOINT_SOCKET") && e.contains(files_var),
                "{e}"
            );
        }
    }

    #[test]
    fn neither_takes_spires_default_socket() {
        let c = cfg(&[]).unwrap();
        let SourceConfig::WorkloadApi(w) = &c.source else {
            panic!("{c:?}");
        };
        assert_eq!(w.socket, PathBuf::from("/tmp/spire-agent/public/api.sock"));
        assert!(w.implicit);
        let c = cfg(&[(ENDPOINT_SOCKET, "unix:///s")]).unwrap();
        let SourceConfig::WorkloadApi(w) = &c.source else {
            panic!("{c:?}");
        };
        assert!(!w.implicit, "a socket that was set is not SPIRE's default");
    }

    #[test]
    fn bad_values_name_their_variable() {
        let e = cfg(&[(ENDPOINT_SOCKET, "/tmp/api.sock")])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("SPIFFE_ENDPOINT_SOCKET="), "{e}");
        let e = cfg(&[
            ("SPIKE_SVID_DIR", "/d"),
            ("SPIKE_TRUST_ROOT_NEXUS", "a.org,,b.org"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("SPIKE_TRUST_ROOT_NEXUS="), "{e}");
    }

    #[tokio::test]
    async fn open_files() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        super::super::pki::init(&ca, "spike.ist").unwrap();
        let out = tmp.path().join("svid");
        let id = super::super::SpiffeId::parse("spiffe://spike.ist/spike/nexus").unwrap();
        super::super::pki::issue(&ca, &id, &out, &[], &[]).unwrap();
        let dir = out.display().to_string();
        let c = cfg(&[("SPIKE_SVID_DIR", &dir)]).unwrap();
        let source = c.open().await.unwrap();
        assert_eq!(source.current().id(), &id);
        assert!(source.state().is_ready());
        assert!(source.describe().starts_with("SVID files "));
    }
}
