//! `spike`: a SPIFFE-native secrets manager after SPIKE, built for high availability on bare
//! metal and VMs. One crate, one binary; the modules below are shared by every subcommand.
//!
//! The data path reads one way — request → identity → policy → store → crypto → response —
//! and no module reaches back up.
//!
//! | module | concern |
//! |---|---|
//! | [`api`] | the wire protocol: routes, JSON shapes, error codes (shared by server and client) |
//! | [`config`] | `SPIKE_*` environment → validated, immutable configuration |
//! | [`crypto`] | root key, AES-256-GCM, HKDF sub-keys, Shamir shards, recovery-shard text |
//! | [`identity`] | SPIFFE IDs, SVID files and their reload, rustls configs, dev PKI |
//! | [`store`] | the backing-store trait and its backends |
//! | [`transport`] | the HTTPS server loop and HTTP helpers shared by Nexus and Keeper |
//! | [`client`] | the HTTPS client for Nexus→Keeper and CLI→Nexus calls |
//! | [`keeper`] | `spike keeper`, the in-memory shard holder |
//! | [`nexus`] | `spike nexus`: key lifecycle, Keeper sync, routes, health |
//! | [`fuzzing`] | entry points for fuzzing the decoders of untrusted input |
//! | [`hardening`] | non-dumpable process, no core files, key pages locked in memory |
//! | [`systemd`] | sd_notify readiness, status, watchdog |
//! | [`cli`] | clap definitions of every subcommand |
//! | [`commands`] | `spike secret`, `spike policy`, `spike cipher`: the client commands |
//! | [`dev`] | `spike dev`: the whole local system in one process |

pub mod api;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod fuzzing;
pub mod hardening;
pub mod identity;
pub mod keeper;
pub mod nexus;
pub mod store;
pub mod systemd;
pub mod transport;

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
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
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested");
    systemd::stopping();
}
