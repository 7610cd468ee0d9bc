//! What `spike` needs from the operating system: the environment as configuration ([`env`]),
//! systemd's notification protocol ([`systemd`]), process hardening ([`hardening`]) and the stop
//! signal ([`shutdown_signal`]). Every other part may use this one; it uses none of them.

pub mod env;
pub mod hardening;
pub mod systemd;

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
