//! S3 test servers for integration tests: the shared ones `./test` starts, and servers of a
//! test's own that it may stop. Three kinds ([`Kind`]):
//!
//! - [`Kind::Moto`]: moto, made atomic and persistent (scripts/s3.sh); `SPIKE_TEST_S3_*`.
//! - [`Kind::SeaweedFs`]: SeaweedFS, a real object store built from the Go module proxy
//!   (scripts/seaweedfs.sh); `SPIKE_TEST_S3_SEAWEEDFS_*`. Its tests skip with a note when
//!   `./test` did not start it, unless `CI` or `SPIKE_REQUIRE_SEAWEEDFS` is set: then they fail.
//! - [`Kind::IgnoresConditions`]: moto that drops `If-Match`/`If-None-Match`
//!   (`scripts/s3.sh start DIR --ignore-conditional-writes`), a server Nexus must refuse.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Which S3 server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// moto (scripts/s3.sh).
    Moto,
    /// SeaweedFS (scripts/seaweedfs.sh).
    SeaweedFs,
    /// moto ignoring conditional headers (scripts/s3.sh --ignore-conditional-writes).
    IgnoresConditions,
}

impl Kind {
    /// The prefix of the variables `./test` exports for its shared server of this kind.
    fn var_prefix(self) -> &'static str {
        match self {
            Kind::Moto | Kind::IgnoresConditions => "SPIKE_TEST_S3_",
            Kind::SeaweedFs => "SPIKE_TEST_S3_SEAWEEDFS_",
        }
    }

    fn script(self) -> &'static str {
        match self {
            Kind::Moto | Kind::IgnoresConditions => {
                concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/s3.sh")
            }
            Kind::SeaweedFs => concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/seaweedfs.sh"),
        }
    }

    /// True when the tests of this kind can run: the shared server's exports are there. For
    /// SeaweedFS, `false` (with a note) when they are not and it is not required; moto is
    /// always required (it installs from PyPI in seconds).
    pub fn available(self) -> bool {
        let var = format!("{}ENDPOINT", self.var_prefix());
        if std::env::var(&var).is_ok() {
            return true;
        }
        let required = self != Kind::SeaweedFs
            || ["CI", "SPIKE_REQUIRE_SEAWEEDFS"].iter().any(|k| {
                std::env::var(k)
                    .map(|v| !matches!(v.trim(), "" | "0" | "false"))
                    .unwrap_or(false)
            });
        if required {
            panic!(
                "{var} is not set: these tests need the {self:?} S3 test server that ./test \
                 starts (eval \"$({} start DIR)\")",
                self.script()
            );
        }
        eprintln!(
            "note: skipping: {var} is not set (./test starts SeaweedFS with scripts/seaweedfs.sh)"
        );
        false
    }
}

/// An S3 test server of this test's own, stopped on drop.
pub struct S3Server {
    pub dir: PathBuf,
    pub kind: Kind,
    /// The script's exports without their prefix: ENDPOINT, BUCKET, REGION, ...
    env: HashMap<String, String>,
}

impl S3Server {
    /// A moto server.
    pub fn start(dir: &Path) -> S3Server {
        S3Server::start_kind(Kind::Moto, dir)
    }

    /// A server of `kind` (for SeaweedFS, check [`Kind::available`] first: the binary is built
    /// by `./test`, and a cold build inside a test takes minutes).
    pub fn start_kind(kind: Kind, dir: &Path) -> S3Server {
        let mut args = vec![kind.script(), "start", dir.to_str().unwrap()];
        if kind == Kind::IgnoresConditions {
            args.push("--ignore-conditional-writes");
        }
        let out = Command::new("bash")
            .args(&args)
            .output()
            .expect("run the S3 test server's script");
        assert!(
            out.status.success(),
            "{} start failed:\n{}",
            kind.script(),
            String::from_utf8_lossy(&out.stderr)
        );
        let prefix = kind.var_prefix();
        let env = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.to_string())))
            .collect();
        S3Server {
            dir: dir.to_path_buf(),
            kind,
            env,
        }
    }

    /// Starts it again on the same directory (same port, same data) after [`S3Server::stop`].
    pub fn restart(&self) {
        let again = S3Server::start_kind(self.kind, &self.dir);
        // `again` names the same server as `self`; only one of them may stop it on drop.
        std::mem::forget(again);
    }

    pub fn stop(&self) {
        let status = Command::new("bash")
            .args([self.kind.script(), "stop", self.dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The Nexus environment for this server's bucket under `prefix`.
    pub fn nexus_env(&self, prefix: &str) -> Vec<(String, String)> {
        nexus_env_from(|k| self.env[k].clone(), prefix.into())
    }

    /// A store configuration for this server's bucket under `prefix`.
    pub fn config(&self, prefix: &str) -> spike::store::S3Config {
        config_from(|k| self.env[k].clone(), prefix.into())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A prefix no other test uses: `name-pid-nanos-n/`.
fn unique_prefix(name: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{name}-{}-{nanos}-{}/",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn shared_var(kind: Kind) -> impl Fn(&str) -> String {
    move |k: &str| {
        let name = format!("{}{k}", kind.var_prefix());
        std::env::var(&name).unwrap_or_else(|_| {
            panic!("{name} is not set: S3 tests need the S3 test servers that ./test starts")
        })
    }
}

fn nexus_env_from(v: impl Fn(&str) -> String, prefix: String) -> Vec<(String, String)> {
    vec![
        ("SPIKE_NEXUS_BACKEND_STORE".into(), "s3".into()),
        ("SPIKE_NEXUS_S3_ENDPOINT".into(), v("ENDPOINT")),
        ("SPIKE_NEXUS_S3_BUCKET".into(), v("BUCKET")),
        ("SPIKE_NEXUS_S3_REGION".into(), v("REGION")),
        ("SPIKE_NEXUS_S3_PREFIX".into(), prefix),
        ("AWS_ACCESS_KEY_ID".into(), v("ACCESS_KEY_ID")),
        ("AWS_SECRET_ACCESS_KEY".into(), v("SECRET_ACCESS_KEY")),
    ]
}

fn config_from(v: impl Fn(&str) -> String, prefix: String) -> spike::store::S3Config {
    spike::store::S3Config {
        endpoint: Some(v("ENDPOINT")),
        bucket: v("BUCKET"),
        prefix,
        region: v("REGION"),
        path_style: true,
        credentials: spike::store::S3Credentials {
            access_key_id: v("ACCESS_KEY_ID"),
            secret_access_key: v("SECRET_ACCESS_KEY"),
            session_token: None,
        },
    }
}

/// The Nexus environment for the shared moto server `./test` started, under a prefix no other
/// test uses. Fails loudly when that server is not there.
pub fn shared_env(name: &str) -> Vec<(String, String)> {
    shared_env_on(Kind::Moto, name)
}

/// [`shared_env`] on the shared server of `kind` (check [`Kind::available`] first).
pub fn shared_env_on(kind: Kind, name: &str) -> Vec<(String, String)> {
    nexus_env_from(shared_var(kind), unique_prefix(name))
}

/// A store configuration for the shared server of `kind`, under a prefix no other test uses.
pub fn shared_config(kind: Kind, name: &str) -> spike::store::S3Config {
    config_from(shared_var(kind), unique_prefix(name))
}

/// Every object name under `cfg.prefix` in its bucket, read with a plain S3 client (not the
/// store, which lists only its own namespaces): what a test checks when nothing may have been
/// written.
pub async fn objects_under_prefix(cfg: &spike::store::S3Config) -> Vec<String> {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(cfg.region.clone()))
        .credentials_provider(Credentials::new(
            &cfg.credentials.access_key_id,
            &cfg.credentials.secret_access_key,
            None,
            None,
            "test",
        ))
        .force_path_style(true)
        .endpoint_url(cfg.endpoint.clone().unwrap())
        .build();
    let client = aws_sdk_s3::Client::from_conf(conf);
    let out = client
        .list_objects_v2()
        .bucket(&cfg.bucket)
        .prefix(&cfg.prefix)
        .send()
        .await
        .expect("ListObjectsV2");
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}
