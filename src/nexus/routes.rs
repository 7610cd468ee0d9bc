//! Nexus's HTTP surface.
//!
//! Order of checks for every request, so that the cheapest refusal comes first and nothing
//! leaks to an unauthenticated caller:
//! 1. `GET`/`HEAD /health` — no client certificate needed (load-balancer checks).
//! 2. Anything but `POST` → 400 `api_bad_request` (SPIKE's fallback).
//! 3. No client certificate → 401 `access_unauthorized`.
//! 4. Root key not loaded → 503 `state_not_ready` (SPIKE's gate).
//! 5. Route by exact path and `?action=`; unknown → 400 `api_bad_request`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use super::{Nexus, Phase};
use crate::store::Store;
use crate::transport::{self, Handler, Peer};

/// How long `/health` waits for the store before calling it unavailable.
const HEALTH_STORE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Api {
    nexus: Arc<Nexus>,
}

impl Api {
    pub fn new(nexus: Arc<Nexus>) -> Api {
        Api { nexus }
    }
}

/// `/health` answer. Carries no secret: the key id is a one-way fingerprint.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keepers_with_shards: Option<usize>,
    threshold: u8,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    inconsistent_keepers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

impl Api {
    async fn health(&self) -> Response<Full<Bytes>> {
        let nexus = &self.nexus;
        let mut health = Health {
            status: "ready",
            backend: nexus.store.backend(),
            key_id: None,
            keepers_with_shards: None,
            threshold: nexus.config.threshold,
            inconsistent_keepers: nexus.inconsistent_keepers(),
            reason: None,
        };
        let status = match nexus.keys() {
            Some(keys) => {
                health.key_id = Some(keys.key_id.clone());
                match tokio::time::timeout(HEALTH_STORE_TIMEOUT, nexus.store.ping()).await {
                    Ok(Ok(())) => StatusCode::OK,
                    Ok(Err(e)) => {
                        health.status = "store_unavailable";
                        health.reason = Some(e.to_string());
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    Err(_) => {
                        health.status = "store_unavailable";
                        health.reason = Some("store did not answer in time".into());
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                }
            }
            None => {
                let phase = nexus.phase();
                health.status = phase.as_str();
                if let Phase::AwaitingKeepers { have, .. } = phase {
                    health.keepers_with_shards = Some(have);
                }
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        transport::json(status, &health)
    }
}

impl Handler for Api {
    async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path == "/health" && (req.method() == Method::GET || req.method() == Method::HEAD) {
            return self.health().await;
        }
        if req.method() != Method::POST {
            return transport::error(StatusCode::BAD_REQUEST, "api_bad_request");
        }
        let Some(_caller) = peer.id.as_ref() else {
            return transport::error(StatusCode::UNAUTHORIZED, "access_unauthorized");
        };
        if self.nexus.keys().is_none() {
            return transport::error(StatusCode::SERVICE_UNAVAILABLE, "state_not_ready");
        }
        transport::error(StatusCode::BAD_REQUEST, "api_bad_request")
    }
}
