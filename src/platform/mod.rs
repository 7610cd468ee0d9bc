//! What `spike` needs from the operating system: the environment as configuration ([`env`]),
//! systemd's notification protocol ([`systemd`]), process hardening ([`hardening`]), the stop
//! signal ([`shutdown_signal`]), SIGHUP ([`survive_hangups`], [`hangups`]) and the Prometheus
//! metrics listener ([`metrics`]). Every other part may use this one; it uses none of them.

pub mod env;
mod exit;
pub mod fs;
pub mod hardening;
pub mod metrics;
pub mod systemd;

pub use exit::CommandError;

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("shutdown requested");
    systemd::stopping();
}

/// Keeps SIGHUP from terminating the process (its default action), whatever the subcommand:
/// logrotate and closing terminals send it, and no `spike` process may die of it. Called once,
/// first thing in `main`; servers that act on it listen with [`hangups`] as well.
pub fn survive_hangups() -> std::io::Result<()> {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, seen).map(|_| ())
}

/// The SIGHUPs this process receives from now on (needs a tokio runtime).
pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// A number in `[0, 1)` that differs between processes and calls: the clock's nanoseconds. Only
/// for spreading retries apart, never for anything secret.
fn spread_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

/// `d` give or take 25 %, so instances started together do not stay in step.
pub fn jitter(d: std::time::Duration) -> std::time::Duration {
    d - d / 4 + (d / 2).mul_f64(spread_fraction())
}

/// A wait between zero and `max`, for retries after a lost compare-and-set.
pub fn up_to(max: std::time::Duration) -> std::time::Duration {
    max.mul_f64(spread_fraction())
}

/// Stops a background task when dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
