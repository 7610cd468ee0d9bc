//! S3 test servers for integration tests (scripts/s3.sh): the shared one `./test` starts, and
//! servers of a test's own that it may stop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An S3 test server of this test's own, stopped on drop.
pub struct S3Server {
    pub dir: PathBuf,
    env: HashMap<String, String>,
}

impl S3Server {
    /// Starts it again on the same directory (same port, same data) after [`S3Server::stop`].
    pub fn restart(&self) {
        let again = S3Server::start(&self.dir);
        // `again` names the same server as `self`; only one of them may stop it on drop.
        std::mem::forget(again);
    }

    pub fn start(dir: &Path) -> S3Server {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/s3.sh");
        let out = Command::new("bash")
            .args([script, "start", dir.to_str().unwrap()])
            .output()
            .expect("run scripts/s3.sh");
        assert!(
            out.status.success(),
            "scripts/s3.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        S3Server {
            dir: dir.to_path_buf(),
            env,
        }
    }

    pub fn stop(&self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/s3.sh");
        let status = Command::new("bash")
            .args([script, "stop", self.dir.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The Nexus environment for this server's bucket under `prefix`.
    pub fn nexus_env(&self, prefix: &str) -> Vec<(String, String)> {
        let v = |k: &str| self.env[k].clone();
        vec![
            ("SPIKE_NEXUS_BACKEND_STORE".into(), "s3".into()),
            (
                "SPIKE_NEXUS_S3_ENDPOINT".into(),
                v("SPIKE_TEST_S3_ENDPOINT"),
            ),
            ("SPIKE_NEXUS_S3_BUCKET".into(), v("SPIKE_TEST_S3_BUCKET")),
            ("SPIKE_NEXUS_S3_REGION".into(), v("SPIKE_TEST_S3_REGION")),
            ("SPIKE_NEXUS_S3_PREFIX".into(), prefix.into()),
            ("AWS_ACCESS_KEY_ID".into(), v("SPIKE_TEST_S3_ACCESS_KEY_ID")),
            (
                "AWS_SECRET_ACCESS_KEY".into(),
                v("SPIKE_TEST_S3_SECRET_ACCESS_KEY"),
            ),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Nexus environment for the shared server `./test` started, under a prefix no other test
/// uses. Fails loudly when that server is not there.
pub fn shared_env(name: &str) -> Vec<(String, String)> {
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| {
            panic!("{k} is not set: S3 tests need the S3 test server that ./test starts")
        })
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    vec![
        ("SPIKE_NEXUS_BACKEND_STORE".into(), "s3".into()),
        (
            "SPIKE_NEXUS_S3_ENDPOINT".into(),
            var("SPIKE_TEST_S3_ENDPOINT"),
        ),
        ("SPIKE_NEXUS_S3_BUCKET".into(), var("SPIKE_TEST_S3_BUCKET")),
        ("SPIKE_NEXUS_S3_REGION".into(), var("SPIKE_TEST_S3_REGION")),
        (
            "SPIKE_NEXUS_S3_PREFIX".into(),
            format!("{name}-{}-{nanos}/", std::process::id()),
        ),
        (
            "AWS_ACCESS_KEY_ID".into(),
            var("SPIKE_TEST_S3_ACCESS_KEY_ID"),
        ),
        (
            "AWS_SECRET_ACCESS_KEY".into(),
            var("SPIKE_TEST_S3_SECRET_ACCESS_KEY"),
        ),
    ]
}
