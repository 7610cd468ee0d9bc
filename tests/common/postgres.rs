//! PostgreSQL for tests: a fresh database per test on the shared throwaway server that `./test`
//! starts (`SPIKE_TEST_POSTGRES_URL`), and dedicated servers for tests that stop theirs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The shared server's URL. Tests fail (never skip) without it.
pub fn admin_url() -> String {
    std::env::var("SPIKE_TEST_POSTGRES_URL")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .expect(
            "SPIKE_TEST_POSTGRES_URL is not set: run the suite with ./test, which starts a \
             throwaway PostgreSQL (scripts/postgres.sh) and exports it",
        )
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (server, _) = base.rsplit_once('/').expect("URL has a database");
    if query.is_empty() {
        format!("{server}/{db}")
    } else {
        format!("{server}/{db}?{query}")
    }
}

fn random_name() -> String {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    format!(
        "t_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Creates an empty database on the server at `admin` and returns its URL. Databases are left
/// behind: the server is thrown away with them.
pub async fn fresh_database_on(admin: &str) -> String {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test PostgreSQL: {e}"));
    let task = tokio::spawn(conn);
    let name = random_name();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    drop(client);
    let _ = task.await;
    with_database(admin, &name)
}

/// A fresh database on the shared test server.
pub async fn fresh_database() -> String {
    fresh_database_on(&admin_url()).await
}

/// A PostgreSQL server of the test's own, started through `scripts/postgres.sh`; stopped on drop.
pub struct PgServer {
    pub dir: PathBuf,
    /// `postgres://...` for database `spike_test`; stable across stop and start.
    pub url: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh")
}

fn run_script(args: &[&str]) -> String {
    let out = Command::new(script())
        .args(args)
        .output()
        .expect("run scripts/postgres.sh");
    assert!(
        out.status.success(),
        "scripts/postgres.sh {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PgServer {
    /// Starts a new server in `parent/pg`. `parent` must be searchable by other users: the
    /// server runs unprivileged when the tests run as root.
    pub fn start(parent: &Path) -> PgServer {
        PgServer::start_named(parent, "pg")
    }

    /// Starts a new server in `parent/name` (several servers of one test side by side).
    pub fn start_named(parent: &Path, name: &str) -> PgServer {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711)).unwrap();
        let dir = parent.join(name);
        let out = run_script(&["start", dir.to_str().unwrap()]);
        PgServer {
            dir,
            url: printed_url(&out),
        }
    }

    /// A streaming-replication standby of this server in `parent/name`, in sync: from now on
    /// a commit on this server returns only once the standby has it (`scripts/postgres.sh
    /// standby`).
    pub fn start_standby(&self, parent: &Path, name: &str) -> PgServer {
        self.standby(parent, name, false)
    }

    /// [`PgServer::start_standby`], but the standby keeps `synchronous_standby_names='*'` for
    /// itself, as a copy of a primary configured in `postgresql.conf` does: once promoted, its
    /// commits wait for a synchronous standby that does not exist.
    pub fn start_standby_inheriting_sync(&self, parent: &Path, name: &str) -> PgServer {
        self.standby(parent, name, true)
    }

    fn standby(&self, parent: &Path, name: &str, inherit_sync: bool) -> PgServer {
        let dir = parent.join(name);
        let mut args = vec!["standby", dir.to_str().unwrap(), self.dir.to_str().unwrap()];
        if inherit_sync {
            args.push("inherit-sync");
        }
        let out = run_script(&args);
        PgServer {
            dir,
            url: printed_url(&out),
        }
    }

    /// Promotes this standby to a primary and waits until it accepts writes.
    pub fn promote(&self) {
        run_script(&["promote", self.dir.to_str().unwrap()]);
    }

    /// Runs one SQL statement as the superuser; returns psql's unaligned output.
    pub fn sql(&self, statement: &str) -> String {
        run_script(&["sql", self.dir.to_str().unwrap(), statement])
    }

    /// SIGKILLs the postmaster, as a crash would.
    pub fn kill(&self) {
        run_script(&["kill", self.dir.to_str().unwrap()]);
    }

    /// `host:port` of this server, for a multi-host URL.
    pub fn host_port(&self) -> &str {
        let rest = self.url.strip_prefix("postgres://spike@").unwrap();
        rest.split_once('/').unwrap().0
    }

    /// Stops the server (`immediate`: as if it crashed; `fast`: a clean shutdown).
    pub fn stop(&self, mode: &str) {
        run_script(&["stop", self.dir.to_str().unwrap(), mode]);
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&self) {
        let out = run_script(&["start", self.dir.to_str().unwrap()]);
        assert!(out.contains(&self.url), "{out} vs {}", self.url);
    }
}

fn printed_url(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("SPIKE_TEST_POSTGRES_URL="))
        .expect("script prints the URL")
        .to_string()
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["stop", self.dir.to_str().unwrap(), "immediate"])
            .output();
    }
}

/// The Nexus environment for the PostgreSQL database at `url`.
pub fn nexus_env(url: &str) -> Vec<(String, String)> {
    vec![
        ("SPIKE_NEXUS_BACKEND_STORE".into(), "postgres".into()),
        ("SPIKE_NEXUS_DB_URL".into(), url.into()),
    ]
}
