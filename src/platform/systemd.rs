//! systemd integration: `sd_notify` readiness, status, watchdog and stopping.
//!
//! Everything here is a no-op unless systemd (or a test) set `NOTIFY_SOCKET`. The watchdog
//! pings at half of `WATCHDOG_USEC`, and only after a health check passed within that half
//! interval: the event loop got to run the check, and (for Nexus) the store answered. A wedged
//! runtime or an unreachable store therefore stops the pings, and systemd restarts the unit.

use std::future::Future;
use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a first status line.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=...`: what `systemctl status` shows.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `STOPPING=1`, sent when a shutdown was requested.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining requests"),
    ]);
}

/// Owns the watchdog task; stops it on drop.
pub struct WatchdogGuard(Option<tokio::task::JoinHandle<()>>);

impl Drop for WatchdogGuard {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Starts pinging the watchdog if systemd asked for one. `healthy` is run every half interval
/// and must finish within it; a ping is sent only when it returns `true` in time.
pub fn spawn_watchdog<F, Fut>(healthy: F) -> WatchdogGuard
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return WatchdogGuard(None);
    };
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return WatchdogGuard(None);
    }
    let half = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(every = ?half, "systemd watchdog enabled");
    WatchdogGuard(Some(tokio::spawn(watchdog_loop(half, healthy, || {
        send(&[NotifyState::Watchdog]);
    }))))
}

/// The watchdog's schedule, apart from systemd so a test can run it on a paused clock: every
/// `half`, run `healthy` with `half` as its deadline, and `ping` when it returned `true` in
/// time. A late tick delays the next ones (never a burst of pings). Runs until dropped.
pub async fn watchdog_loop<F, Fut>(half: Duration, healthy: F, mut ping: impl FnMut())
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut ticker = tokio::time::interval(half);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        let ok = matches!(tokio::time::timeout(half, healthy()).await, Ok(true));
        if ok {
            ping();
            if failing {
                tracing::info!("health check passes again; watchdog pings resumed");
            }
        } else if !failing {
            tracing::warn!("health check failed; withholding watchdog pings");
        }
        failing = !ok;
    }
}
