//! Nexus's HTTP surface: SPIKE's routes (see the table in [`crate::api`]) and `/health`.
//!
//! Order of checks for every request, so that the cheapest refusal comes first and nothing
//! leaks to an unauthenticated caller:
//! 1. `GET`/`HEAD /health` — no client certificate needed (load-balancer checks).
//! 2. Anything but `POST` → 400 `api_bad_request` (SPIKE's fallback).
//! 3. No client certificate → 401 `access_unauthorized` (the TLS layer already refused
//!    certificates that do not chain to our bundle or name another trust domain).
//! 4. Unknown path or `?action=` → 400.
//! 5. Root key not loaded → 503 `state_not_ready` (SPIKE's gate).
//! 6. Body over the limit → 413; malformed JSON → 400; invalid input → 400.
//! 7. Identity and policy: superuser operators pass; workloads need a policy read from the
//!    store now; Keeper, Nexus, recover/restore identities are refused (401).
//!
//! Every API request ends with one audit line (target `spike::audit`): caller, action,
//! resource (path or policy name, never a value), status, duration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::policy::{self, Permission};
use super::{ApiError, Keys, Nexus, Phase, cipher, recovery, secrets};
use crate::api::{self, Empty};
use crate::identity::{Role, SpiffeId, TrustRoots};
use crate::store::{Entry, Namespace, Store};
use crate::transport::{self, Handler, Peer};

/// How long `/health` waits for the store before calling it unavailable.
const HEALTH_STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// Every API operation, by (path, action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    SecretPut,
    SecretGet,
    SecretDelete,
    SecretUndelete,
    SecretList,
    SecretMetadata,
    PolicyPut,
    PolicyGet,
    PolicyDelete,
    PolicyList,
    Encrypt,
    Decrypt,
    Recover,
    Restore,
}

impl Route {
    fn find(path: &str, action: Option<&str>) -> Option<Route> {
        Some(match (path, action.unwrap_or("")) {
            (api::SECRETS_PATH, "") => Route::SecretPut,
            (api::SECRETS_PATH, "get") => Route::SecretGet,
            (api::SECRETS_PATH, "delete") => Route::SecretDelete,
            (api::SECRETS_PATH, "undelete") => Route::SecretUndelete,
            (api::SECRETS_PATH, "list") => Route::SecretList,
            (api::SECRET_METADATA_PATH, "get") => Route::SecretMetadata,
            (api::POLICY_PATH, "") => Route::PolicyPut,
            (api::POLICY_PATH, "get") => Route::PolicyGet,
            (api::POLICY_PATH, "delete") => Route::PolicyDelete,
            (api::POLICY_PATH, "list") => Route::PolicyList,
            (api::ENCRYPT_PATH, "") => Route::Encrypt,
            (api::DECRYPT_PATH, "") => Route::Decrypt,
            (api::RECOVER_PATH, "") => Route::Recover,
            (api::RESTORE_PATH, "") => Route::Restore,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Route::SecretPut => "secret.put",
            Route::SecretGet => "secret.get",
            Route::SecretDelete => "secret.delete",
            Route::SecretUndelete => "secret.undelete",
            Route::SecretList => "secret.list",
            Route::SecretMetadata => "secret.metadata",
            Route::PolicyPut => "policy.put",
            Route::PolicyGet => "policy.get",
            Route::PolicyDelete => "policy.delete",
            Route::PolicyList => "policy.list",
            Route::Encrypt => "cipher.encrypt",
            Route::Decrypt => "cipher.decrypt",
            Route::Recover => "operator.recover",
            Route::Restore => "operator.restore",
        }
    }
}

/// `?action=` from a query string (the first one, as Go's `Query().Get`).
fn action(query: Option<&str>) -> Option<&str> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("action="))
}

/// What kind of caller this is, for authorisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    /// Operators with the superuser role: everything, no policies.
    Superuser,
    /// SPIKE's "lite" workloads: the cipher only.
    Lite,
    /// Everyone else in the trust domain: what policies grant.
    Workload,
    /// Nexus, Keeper, recover and restore identities: no secrets, policies or cipher.
    Refused,
}

fn classify(id: &SpiffeId, trust: &TrustRoots) -> Caller {
    match trust.role_of(id) {
        Some(Role::Superuser) => Caller::Superuser,
        // SPIKE_TRUST_ROOT_LITE_WORKLOAD decides, as in SPIKE.
        Some(Role::Workload) if trust.is_lite_workload(id) => Caller::Lite,
        Some(Role::Workload) => Caller::Workload,
        _ => Caller::Refused,
    }
}

/// What a caller's role alone decides: superusers may, everyone but workloads may not.
fn granted_by_role(kind: Caller) -> Result<(), ApiError> {
    match kind {
        Caller::Superuser => Ok(()),
        Caller::Workload | Caller::Lite | Caller::Refused => Err(ApiError::Unauthorized),
    }
}

/// Whether the policies in `rows` (a scan of [`Namespace::Policies`]) let `caller` do `want`
/// on `path`.
fn granted(
    keys: &Keys,
    caller: &SpiffeId,
    rows: Vec<(String, Vec<u8>)>,
    path: &str,
    want: &[Permission],
) -> Result<(), ApiError> {
    let policies = policy::open_all(&keys.policies, rows);
    if policy::allowed(&policies, caller, path, want) {
        Ok(())
    } else {
        tracing::info!(caller = %caller, path, want = ?want, "no policy grants this");
        Err(ApiError::Unauthorized)
    }
}

pub struct Api {
    nexus: Arc<Nexus>,
}

impl Api {
    pub fn new(nexus: Arc<Nexus>) -> Api {
        Api { nexus }
    }

    fn store(&self) -> &crate::store::AnyStore {
        &self.nexus.store
    }

    /// Refuses unless `caller` may do `want` on `path`.
    async fn authorize(
        &self,
        keys: &Keys,
        caller: &SpiffeId,
        kind: Caller,
        path: &str,
        want: &[Permission],
    ) -> Result<(), ApiError> {
        match kind {
            Caller::Workload => {
                let rows = self.store().scan(Namespace::Policies).await?;
                granted(keys, caller, rows, path, want)
            }
            _ => granted_by_role(kind),
        }
    }

    /// Reads the secret record at `path` for a caller that wants to read it, refusing unless
    /// `caller` may: for a workload, the policies and the record are read together (one
    /// transaction where the store has them), and the record is only looked at once a policy
    /// grants the read.
    async fn authorized_read(
        &self,
        keys: &Keys,
        caller: &SpiffeId,
        kind: Caller,
        path: &str,
    ) -> Result<Option<Entry>, ApiError> {
        let want = [Permission::Read];
        match kind {
            Caller::Workload => {
                let (rows, entry) = self
                    .store()
                    .scan_and_get(Namespace::Policies, Namespace::Secrets, path)
                    .await?;
                granted(keys, caller, rows, path, &want)?;
                Ok(entry)
            }
            _ => {
                granted_by_role(kind)?;
                Ok(self.store().get(Namespace::Secrets, path).await?)
            }
        }
    }

    async fn dispatch(
        &self,
        route: Route,
        req: Request<Incoming>,
        caller: &SpiffeId,
        keys: &Keys,
        resource: &mut String,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let cfg = &self.nexus.config;
        let kind = classify(caller, cfg.identity.trust());
        let stream = req
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/octet-stream");
        let body = match transport::read_body(req.into_body(), cfg.max_body_bytes).await {
            Ok(body) => body,
            Err(transport::BodyError::TooLarge(_)) => return Err(ApiError::TooLarge),
            Err(transport::BodyError::Read) => {
                return Err(ApiError::BadRequest(
                    "request body could not be read".into(),
                ));
            }
        };
        let store = self.store();
        match route {
            Route::SecretPut => {
                let r: api::SecretPutRequest = parse(&body)?;
                *resource = r.path.clone();
                secrets::validate_path(&r.path)?;
                self.authorize(keys, caller, kind, &r.path, &[Permission::Write])
                    .await?;
                let version = secrets::put(
                    store,
                    &self.nexus.writers,
                    &keys.secrets,
                    &r.path,
                    &r.values,
                    secrets::PutOptions {
                        cas: r.cas,
                        request_id: r.request_id.as_deref(),
                        max_versions: cfg.max_secret_versions,
                    },
                )
                .await?;
                ok(&api::SecretPutResponse { version })
            }
            Route::SecretGet => {
                let r: api::SecretGetRequest = parse(&body)?;
                *resource = r.path.clone();
                secrets::validate_path(&r.path)?;
                let entry = self.authorized_read(keys, caller, kind, &r.path).await?;
                let (data, version) =
                    secrets::open_version(&keys.secrets, &r.path, entry.as_ref(), r.version)?;
                ok(&api::SecretGetResponse { data, version })
            }
            Route::SecretDelete | Route::SecretUndelete => {
                let r: api::SecretVersionsRequest = parse(&body)?;
                *resource = r.path.clone();
                secrets::validate_path(&r.path)?;
                self.authorize(keys, caller, kind, &r.path, &[Permission::Write])
                    .await?;
                if route == Route::SecretDelete {
                    secrets::delete(store, &self.nexus.writers, &r.path, &r.versions).await?;
                } else {
                    secrets::undelete(store, &self.nexus.writers, &r.path, &r.versions).await?;
                }
                ok(&Empty {})
            }
            Route::SecretMetadata => {
                let r: api::SecretGetRequest = parse(&body)?;
                *resource = r.path.clone();
                secrets::validate_path(&r.path)?;
                self.authorize(keys, caller, kind, &r.path, &[Permission::Read])
                    .await?;
                ok(&secrets::metadata(store, &r.path, r.version).await?)
            }
            Route::SecretList => {
                let r: api::SecretListRequest = parse(&body)?;
                let prefix = r.prefix.unwrap_or_default();
                *resource = prefix.clone();
                let keys_list = self.list_for(keys, caller, kind, &prefix).await?;
                ok(&api::SecretListResponse { keys: keys_list })
            }
            Route::PolicyPut => {
                let r: api::PolicyPutRequest = parse(&body)?;
                *resource = r.name.clone();
                self.authorize(keys, caller, kind, policy::ACL_PATH, &[Permission::Write])
                    .await?;
                policy::put(store, &keys.policies, &r).await?;
                ok(&Empty {})
            }
            Route::PolicyGet | Route::PolicyDelete => {
                let r: api::PolicyIdRequest = parse(&body)?;
                *resource = r.id.clone();
                let want = if route == Route::PolicyGet {
                    Permission::Read
                } else {
                    Permission::Write
                };
                self.authorize(keys, caller, kind, policy::ACL_PATH, &[want])
                    .await?;
                if route == Route::PolicyGet {
                    ok(&policy::get(store, &keys.policies, &r.id).await?.to_api())
                } else {
                    policy::delete(store, &r.id).await?;
                    ok(&Empty {})
                }
            }
            Route::PolicyList => {
                let r: api::PolicyListRequest = parse(&body)?;
                self.authorize(keys, caller, kind, policy::ACL_PATH, &[Permission::List])
                    .await?;
                let policies = policy::all(store, &keys.policies)
                    .await?
                    .into_iter()
                    .filter(|p| match (&r.spiffeid_pattern, &r.path_pattern) {
                        (Some(id), _) => p.spiffeid_pattern == *id,
                        (None, Some(path)) => p.path_pattern == *path,
                        (None, None) => true,
                    })
                    .map(|p| p.to_api())
                    .collect();
                ok(&api::PolicyListResponse { policies })
            }
            Route::Recover => {
                if cfg.identity.trust().role_of(caller) != Some(Role::Recover) {
                    return Err(ApiError::Unauthorized);
                }
                let _: Empty = parse(&body)?;
                ok(&recovery::export(&self.nexus, keys)?)
            }
            Route::Restore => Err(ApiError::Internal(
                "restore is routed before the key gate".into(),
            )),
            Route::Encrypt | Route::Decrypt => {
                if kind != Caller::Lite {
                    self.authorize(
                        keys,
                        caller,
                        kind,
                        policy::CIPHER_PATH,
                        &[Permission::Execute],
                    )
                    .await?;
                }
                Ok(self.cipher(route, stream, &body, keys))
            }
        }
    }

    /// Secret paths under `prefix` that `caller` may list: everything for superusers and for
    /// `list` on `spike/system/secret` (SPIKE's rule), otherwise the paths some policy grants
    /// `list` on. A caller no `list` policy names at all is refused.
    async fn list_for(
        &self,
        keys: &Keys,
        caller: &SpiffeId,
        kind: Caller,
        prefix: &str,
    ) -> Result<Vec<String>, ApiError> {
        let paths = secrets::list(self.store(), prefix).await?;
        match kind {
            Caller::Superuser => Ok(paths),
            Caller::Workload => {
                let policies = policy::all(self.store(), &keys.policies).await?;
                if policy::allowed(
                    &policies,
                    caller,
                    policy::SECRET_LIST_PATH,
                    &[Permission::List],
                ) {
                    return Ok(paths);
                }
                let listers: Vec<_> = policies
                    .into_iter()
                    .filter(|p| policy::names(p, caller) && policy::grants(p, &[Permission::List]))
                    .collect();
                if listers.is_empty() {
                    return Err(ApiError::Unauthorized);
                }
                Ok(paths
                    .into_iter()
                    .filter(|path| policy::allowed(&listers, caller, path, &[Permission::List]))
                    .collect())
            }
            Caller::Lite | Caller::Refused => Err(ApiError::Unauthorized),
        }
    }

    fn cipher(
        &self,
        route: Route,
        stream: bool,
        body: &[u8],
        keys: &Keys,
    ) -> Response<Full<Bytes>> {
        let limit = self.nexus.config.max_cipher_bytes;
        const OCTETS: &str = "application/octet-stream";
        let result = match (route, stream) {
            (Route::Encrypt, true) => {
                cipher::encrypt(&keys.cipher, body, limit).map(|(nonce, ct)| {
                    transport::bytes(StatusCode::OK, OCTETS, cipher::frame(&nonce, &ct))
                })
            }
            (Route::Decrypt, true) => cipher::unframe(body)
                .and_then(|(v, n, c)| cipher::decrypt(&keys.cipher, v, n, c, limit))
                .map(|plain| transport::bytes(StatusCode::OK, OCTETS, plain.to_vec())),
            (Route::Encrypt, false) => parse::<api::EncryptRequest>(body)
                .and_then(|r| cipher::encrypt(&keys.cipher, &r.plaintext, limit))
                .map(|(nonce, ct)| {
                    transport::json(
                        StatusCode::OK,
                        &api::EncryptResponse {
                            version: api::CIPHER_VERSION,
                            nonce: nonce.to_vec(),
                            ciphertext: ct,
                        },
                    )
                }),
            (_, false) => parse::<api::DecryptRequest>(body)
                .and_then(|r| {
                    cipher::decrypt(&keys.cipher, r.version, &r.nonce, &r.ciphertext, limit)
                })
                .map(|plain| {
                    transport::json(
                        StatusCode::OK,
                        &api::DecryptResponse {
                            plaintext: plain.to_vec(),
                        },
                    )
                }),
            (_, true) => Err(ApiError::BadRequest("unknown cipher operation".into())),
        };
        match result {
            Ok(resp) => resp,
            // Stream callers get SPIKE's plain-text error bodies.
            Err(e) if stream => transport::bytes(
                e.code().status(),
                "text/plain; charset=utf-8",
                e.code().as_str().as_bytes().to_vec(),
            ),
            Err(e) => error_response(&e),
        }
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))
}

fn ok<T: Serialize>(body: &T) -> Result<Response<Full<Bytes>>, ApiError> {
    Ok(transport::json(StatusCode::OK, body))
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let code = e.code();
    transport::error(code.status(), code.as_str())
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
        let path = req.uri().path().to_string();
        if path == api::HEALTH_PATH && (req.method() == Method::GET || req.method() == Method::HEAD)
        {
            return self.health().await;
        }
        if req.method() != Method::POST {
            return error_response(&ApiError::BadRequest("only POST".into()));
        }
        let Some(caller) = peer.id.as_ref() else {
            return error_response(&ApiError::Unauthorized);
        };
        let Some(route) = Route::find(&path, action(req.uri().query())) else {
            return error_response(&ApiError::BadRequest("unknown route".into()));
        };
        let started = Instant::now();
        if route == Route::Restore {
            // The escape hatch works without a key (that is its point); only restore operators.
            let result = self.restore(req, caller).await;
            return self.audited(caller, route, "", started, result);
        }
        let Some(keys) = self.nexus.keys() else {
            return error_response(&ApiError::NotReady);
        };
        let mut resource = String::new();
        let result = self
            .dispatch(route, req, caller, &keys, &mut resource)
            .await;
        self.audited(caller, route, &resource, started, result)
    }
}

impl Api {
    /// Turns a result into a response, logging failures and writing the audit line.
    fn audited(
        &self,
        caller: &SpiffeId,
        route: Route,
        resource: &str,
        started: Instant,
        result: Result<Response<Full<Bytes>>, ApiError>,
    ) -> Response<Full<Bytes>> {
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                match &e {
                    ApiError::Store(_)
                    | ApiError::Internal(_)
                    | ApiError::Crypto(_)
                    | ApiError::Contended => {
                        tracing::error!(
                            caller = %caller,
                            action = route.name(),
                            backend = self.nexus.store.backend(),
                            error = %e,
                            "request failed"
                        );
                    }
                    _ => {
                        tracing::info!(caller = %caller, action = route.name(), error = %e, "request refused")
                    }
                }
                error_response(&e)
            }
        };
        tracing::info!(
            target: "spike::audit",
            caller = %caller,
            action = route.name(),
            resource = %resource,
            status = resp.status().as_u16(),
            micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "audit"
        );
        resp
    }

    /// `/v1/operator/restore`: restore-role operators only, with or without a key.
    async fn restore(
        &self,
        req: Request<Incoming>,
        caller: &SpiffeId,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        if self.nexus.config.identity.trust().role_of(caller) != Some(Role::Restore) {
            return Err(ApiError::Unauthorized);
        }
        let body = self.body(req).await?;
        let r: api::RestoreRequest = parse(&body)?;
        ok(&recovery::restore(&self.nexus, &r).await?)
    }

    async fn body(&self, req: Request<Incoming>) -> Result<Bytes, ApiError> {
        match transport::read_body(req.into_body(), self.nexus.config.max_body_bytes).await {
            Ok(body) => Ok(body),
            Err(transport::BodyError::TooLarge(_)) => Err(ApiError::TooLarge),
            Err(transport::BodyError::Read) => Err(ApiError::BadRequest(
                "request body could not be read".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_actions() {
        assert_eq!(
            Route::find("/v1/store/secrets", None),
            Some(Route::SecretPut)
        );
        assert_eq!(
            Route::find("/v1/store/secrets", action(Some("action=get"))),
            Some(Route::SecretGet)
        );
        assert_eq!(
            Route::find("/v1/store/secrets", action(Some("x=1&action=list"))),
            Some(Route::SecretList)
        );
        assert_eq!(Route::find("/v1/store/secrets/", None), None);
        assert_eq!(
            Route::find("/v1/store/secrets", action(Some("action=read"))),
            None
        );
        assert_eq!(Route::find("/v1/store/secrets/metadata", None), None);
        assert_eq!(
            Route::find("/v1/acl/policy", action(Some("action=list"))),
            Some(Route::PolicyList)
        );
    }

    #[test]
    fn caller_kinds() {
        let td = TrustRoots::single("spike.ist").unwrap();
        let k = |s: &str| classify(&SpiffeId::parse(s).unwrap(), &td);
        assert_eq!(
            k("spiffe://spike.ist/spike/pilot/role/superuser"),
            Caller::Superuser
        );
        assert_eq!(
            k("spiffe://spike.ist/spike/workload/role/lite"),
            Caller::Lite
        );
        assert_eq!(k("spiffe://spike.ist/app/web"), Caller::Workload);
        assert_eq!(k("spiffe://spike.ist/spike/keeper/1"), Caller::Refused);
        assert_eq!(k("spiffe://spike.ist/spike/nexus"), Caller::Refused);
        assert_eq!(
            k("spiffe://spike.ist/spike/pilot/role/recover"),
            Caller::Refused
        );
        assert_eq!(k("spiffe://other.org/app/web"), Caller::Refused);
    }
}
