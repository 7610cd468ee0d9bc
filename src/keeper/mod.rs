//! `spike keeper`: holds one Shamir shard of the root key, in memory only.
//!
//! A Keeper knows nothing of other Keepers or of the key. Only Nexus identities get through its
//! TLS handshake (and each request checks the role again). Nexus pushes the shard with
//! `/v1/store/contribute` and reads it back with `/v1/store/shard` (SPIKE's routes and shapes).
//! The shard is kept with its Shamir index when Nexus sends one, so a reordered peer list in
//! Nexus cannot silently relabel it. A restarted Keeper is empty until Nexus refills it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use zeroize::{Zeroize, Zeroizing};

pub mod config;

use crate::crypto::Share;
use crate::identity::{ClientAuth, Role, TrustRoots};
use crate::platform::metrics::{Connections, KeeperMetrics};
use crate::protocol::keeper::{CONTRIBUTE_PATH, ContributeRequest, SHARD_PATH, ShardResponse};
use crate::transport::{self, Handler, Peer};
pub use config::KeeperConfig;

/// Largest request body a Keeper reads: a shard request is well under 1 KiB.
const MAX_BODY: usize = 4096;

/// The shard this Keeper holds.
struct Held {
    /// The Shamir index Nexus sent with the shard, if it sent one.
    index: Option<u8>,
    value: Zeroizing<[u8; 32]>,
}

/// The Keeper's request handler and its only state.
pub struct Keeper {
    /// The trust domains whose Nexus may talk to us (`SPIKE_TRUST_ROOT_NEXUS`).
    trust: TrustRoots,
    /// The shard, if Nexus has sent one since this process started.
    shard: Mutex<Option<Held>>,
    /// How long a request body may take to arrive.
    body_timeout: std::time::Duration,
    /// What `SPIKE_KEEPER_METRICS_ADDR` serves.
    metrics: Arc<KeeperMetrics>,
}

impl Keeper {
    /// An empty Keeper serving the Nexus of the trust domains in `trust`, counting into
    /// `metrics`.
    pub fn new(
        trust: TrustRoots,
        body_timeout: std::time::Duration,
        metrics: Arc<KeeperMetrics>,
    ) -> Keeper {
        Keeper {
            trust,
            shard: Mutex::new(None),
            body_timeout,
            metrics,
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        // The Option is replaced whole, so a panic elsewhere cannot leave it half-written.
        self.shard.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn contribute(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let Ok(mut req) = serde_json::from_slice::<ContributeRequest>(body) else {
            return transport::error(StatusCode::BAD_REQUEST, "api_bad_request");
        };
        let Some(value) = req.shard.take().map(Zeroizing::new) else {
            return transport::error(StatusCode::BAD_REQUEST, "api_bad_request");
        };
        // Share::new checks the index range and that the value is a non-zero scalar below the
        // group order; SPIKE's Nexus sends no index, so check the value under index 1.
        if let Err(e) = Share::new(req.id.unwrap_or(1), *value) {
            tracing::warn!(error = %e, "refused a malformed shard");
            return transport::error(StatusCode::BAD_REQUEST, "api_bad_request");
        }
        let mut held = self.held();
        let changed = held
            .as_ref()
            .is_none_or(|h| h.index != req.id || *h.value != *value);
        *held = Some(Held {
            index: req.id,
            value,
        });
        drop(held);
        self.metrics.shard_accepted(req.id);
        if changed {
            tracing::info!(index = ?req.id, "holding a new shard");
            crate::platform::systemd::status(&match req.id {
                Some(i) => format!("holding shard {i}"),
                None => "holding a shard".to_string(),
            });
        } else {
            tracing::debug!(index = ?req.id, "shard refreshed");
        }
        transport::json(StatusCode::OK, &serde_json::json!({}))
    }

    fn shard(&self, body: &[u8]) -> Response<Full<Bytes>> {
        if serde_json::from_slice::<serde_json::Value>(body).is_err() {
            return shard_error(StatusCode::BAD_REQUEST, "api_bad_request");
        }
        let held = self.held();
        let Some(h) = held.as_ref() else {
            drop(held);
            tracing::info!("asked for a shard while holding none");
            return shard_error(StatusCode::BAD_REQUEST, "api_bad_request");
        };
        let mut reply = ShardResponse {
            shard: Some(*h.value),
            id: h.index,
            err: String::new(),
        };
        drop(held);
        let resp = transport::json(StatusCode::OK, &reply);
        reply.shard.zeroize();
        resp
    }
}

fn shard_error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    transport::json(
        status,
        &ShardResponse {
            shard: None,
            id: None,
            err: code.to_string(),
        },
    )
}

impl Keeper {
    /// Whether `peer` is a Nexus of the trusted domains.
    fn is_nexus(&self, peer: &Peer) -> bool {
        peer.id
            .as_ref()
            .is_some_and(|id| self.trust.role_of(id) == Some(Role::Nexus))
    }
}

impl Handler for Keeper {
    fn connections(&self) -> Option<&Connections> {
        Some(&self.metrics.connections)
    }

    /// Nexus is a Keeper's only caller, so the reserve is Nexus's: callers that hold every
    /// ordinary connection (only Nexus identities pass the handshake) do not lock out the
    /// Nexus instances pushing or fetching shards.
    fn privileged(&self, peer: &Peer) -> bool {
        self.is_nexus(peer)
    }

    async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        let route = match req.uri().path() {
            CONTRIBUTE_PATH => "contribute",
            SHARD_PATH => "shard",
            _ => "none",
        };
        let resp = self.answer(req, peer).await;
        self.metrics.request(route, resp.status().as_u16());
        resp
    }
}

impl Keeper {
    async fn answer(&self, req: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        if req.method() != Method::POST {
            return transport::error(StatusCode::BAD_REQUEST, "api_bad_request");
        }
        // The handshake already refused anyone but Nexus; check again so a configuration
        // mistake in the TLS layer cannot open the shard.
        if !self.is_nexus(&peer) {
            tracing::warn!(peer = ?peer.id.as_ref().map(|id| id.to_string()), "refused a caller that is not Nexus");
            return transport::error(StatusCode::UNAUTHORIZED, "access_unauthorized");
        }
        let path = req.uri().path().to_string();
        if path != CONTRIBUTE_PATH && path != SHARD_PATH {
            return transport::error(StatusCode::BAD_REQUEST, "api_bad_request");
        }
        let body = match transport::read_body(req.into_body(), MAX_BODY, self.body_timeout).await {
            Ok(body) => body,
            Err(e) => {
                let code = e.code();
                return transport::error(code.status(), code.as_str());
            }
        };
        let resp = if path == CONTRIBUTE_PATH {
            self.contribute(&body)
        } else {
            self.shard(&body)
        };
        // The request body may hold a shard: wipe our copy.
        transport::wipe_body(body);
        resp
    }
}

/// Runs a Keeper on `cfg.listen` until `shutdown` completes.
pub async fn run(
    cfg: KeeperConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), transport::StartError> {
    let listen = transport::Listen::Bind(cfg.listen);
    run_with(cfg, listen, shutdown).await
}

/// Runs a Keeper on a listener the caller bound (`cfg.listen` is not used) until `shutdown`
/// completes: a test binds `127.0.0.1:0` and knows the address before the Keeper starts.
pub async fn run_on(
    cfg: KeeperConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), transport::StartError> {
    run_with(cfg, transport::Listen::Bound(listener), shutdown).await
}

async fn run_with(
    cfg: KeeperConfig,
    listen: transport::Listen,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), transport::StartError> {
    crate::platform::hardening::harden_process();
    let metrics = Arc::new(KeeperMetrics::new(
        crate::crypto::shamir::ShardDerivation::default().name(),
    ));
    // Bound before anything else, so a busy address is the first thing said.
    let _metrics_server = match cfg.metrics {
        None => None,
        Some(addr) => {
            let (listener, addr) =
                crate::platform::metrics::bind("SPIKE_KEEPER_METRICS_ADDR", addr).await?;
            tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
            Some(crate::platform::metrics::serve(
                listener,
                metrics.registry(),
            ))
        }
    };
    let own =
        transport::OwnIdentity::load(&cfg.identity, Role::Keeper, Some(&metrics.svid)).await?;
    let tls = crate::identity::server_config_for(
        &own.source,
        &cfg.identity.trust,
        ClientAuth::Require(vec![Role::Nexus]),
    )?;
    let (listener, addr) = listen.open().await?;
    tracing::info!(%addr, id = %own.id, "keeper listening on {addr}; holding no shard until Nexus sends one");
    let keeper = Arc::new(Keeper::new(
        cfg.identity.trust.clone(),
        cfg.server.body_timeout,
        metrics,
    ));
    // The shard lives inline in the Keeper, which lives as long as the process.
    crate::platform::hardening::lock(&*keeper, "keeper shard");
    crate::platform::systemd::ready("holding no shard (waiting for Nexus)");
    // A Keeper has no dependency to check: a ping shows the event loop still runs.
    let _watchdog = crate::platform::systemd::spawn_watchdog(|| async { true });
    transport::serve(listener, tls, keeper, cfg.server, shutdown).await;
    tracing::info!("keeper stopped; shard wiped");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    #[test]
    fn the_reserve_is_for_nexus_only() {
        let keeper = Keeper::new(
            TrustRoots::single("spike.ist").unwrap(),
            std::time::Duration::from_secs(1),
            Arc::new(crate::platform::metrics::KeeperMetrics::new(
                "rejection_sampling",
            )),
        );
        let peer = |id: Option<&str>| Peer {
            id: id.map(|s| SpiffeId::parse(s).unwrap()),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 1)),
        };
        assert!(keeper.privileged(&peer(Some("spiffe://spike.ist/spike/nexus"))));
        for other in [
            Some("spiffe://spike.ist/spike/keeper/1"),
            Some("spiffe://spike.ist/spike/pilot/role/superuser"),
            Some("spiffe://other.org/spike/nexus"),
            None,
        ] {
            assert!(!keeper.privileged(&peer(other)), "{other:?}");
        }
    }
}
