//! Nexus's HTTP surface: SPIKE's routes (see the table in [`crate::protocol::nexus`]) and `/health`.
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
//! 7. Identity and policy: superuser operators pass; workloads need a policy of the policy book
//!    as the store holds it now; Keeper, Nexus, recover/restore identities are refused (401).
//!
//! Every API request ends with one audit line (target `spike::audit`): caller, action,
//! resource (path or policy name, never a value), status, duration. Every answered request,
//! audited or not, counts in the metrics by route, action and status
//! ([`crate::platform::metrics`]); the caller and the resource never do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::authz::{Access, Need};
use super::keyring::Keyring;
use super::policy::{self, Permission};
use super::{ApiError, Keys, Nexus, Phase, cipher, recovery, secrets};
use crate::identity::{IdentityState, Role, SpiffeId, SvidSource};
use crate::platform::metrics::{AuditResult, AuditSink, Connections, NexusMetrics};
use crate::protocol::nexus::{self as wire, Empty};
use crate::store::Store;

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
    Rotate,
    Reencrypt,
    Retire,
    Rekey,
}

impl Route {
    /// The route a request names: its exact path and SPIKE's `?action=`. The query must be
    /// absent, or exactly one `action=` pair; SPIKE's empty action (none, or `action=`) is a
    /// put where the path has one. Anything else — an unknown or misspelt action, another
    /// parameter, an encoded or repeated `action` — is refused, never taken for a put.
    fn find(path: &str, query: Option<&str>) -> Result<Route, ApiError> {
        let action = match query.filter(|q| !q.is_empty()) {
            None => "",
            Some(q) => match q.strip_prefix("action=") {
                Some(a) if a.bytes().all(|b| b.is_ascii_lowercase()) => a,
                _ => {
                    return Err(ApiError::BadRequest(
                        "the query must be empty or one ?action= with a known action".into(),
                    ));
                }
            },
        };
        Ok(match (path, action) {
            (wire::SECRETS_PATH, "") => Route::SecretPut,
            (wire::SECRETS_PATH, "get") => Route::SecretGet,
            (wire::SECRETS_PATH, "delete") => Route::SecretDelete,
            (wire::SECRETS_PATH, "undelete") => Route::SecretUndelete,
            (wire::SECRETS_PATH, "list") => Route::SecretList,
            (wire::SECRET_METADATA_PATH, "get") => Route::SecretMetadata,
            (wire::POLICY_PATH, "") => Route::PolicyPut,
            (wire::POLICY_PATH, "get") => Route::PolicyGet,
            (wire::POLICY_PATH, "delete") => Route::PolicyDelete,
            (wire::POLICY_PATH, "list") => Route::PolicyList,
            (wire::ENCRYPT_PATH, "") => Route::Encrypt,
            (wire::DECRYPT_PATH, "") => Route::Decrypt,
            (wire::RECOVER_PATH, "") => Route::Recover,
            (wire::RESTORE_PATH, "") => Route::Restore,
            (wire::ROTATE_PATH, "") => Route::Rotate,
            (wire::REENCRYPT_PATH, "") => Route::Reencrypt,
            (wire::RETIRE_PATH, "") => Route::Retire,
            (wire::REKEY_PATH, "") => Route::Rekey,
            _ => return Err(ApiError::BadRequest("unknown route or action".into())),
        })
    }

    /// What the route asks of its caller, decided before the body is read.
    fn need(self) -> Need {
        match self {
            Route::SecretPut | Route::SecretDelete | Route::SecretUndelete => {
                Need::Permission(Permission::Write)
            }
            Route::SecretGet | Route::SecretMetadata => Need::Permission(Permission::Read),
            Route::SecretList | Route::PolicyList => Need::Permission(Permission::List),
            Route::PolicyPut | Route::PolicyDelete => Need::Permission(Permission::Write),
            Route::PolicyGet => Need::Permission(Permission::Read),
            Route::Encrypt | Route::Decrypt => Need::Permission(Permission::Execute),
            Route::Recover => Need::Role(Role::Recover),
            Route::Restore => Need::Role(Role::Restore),
            Route::Rotate | Route::Reencrypt | Route::Retire | Route::Rekey => {
                Need::Role(Role::Superuser)
            }
        }
    }

    /// The endpoint, as the `route` label of the request metrics names it.
    fn endpoint(self) -> &'static str {
        match self {
            Route::SecretPut
            | Route::SecretGet
            | Route::SecretDelete
            | Route::SecretUndelete
            | Route::SecretList => "secrets",
            Route::SecretMetadata => "secrets_metadata",
            Route::PolicyPut | Route::PolicyGet | Route::PolicyDelete | Route::PolicyList => {
                "policy"
            }
            Route::Encrypt => "encrypt",
            Route::Decrypt => "decrypt",
            Route::Recover => "recover",
            Route::Restore => "restore",
            Route::Rotate => "rotate",
            Route::Reencrypt => "reencrypt",
            Route::Retire => "retire",
            Route::Rekey => "rekey",
        }
    }

    /// The action, as the audit line and the request metrics name it.
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
            // Audited before the key is loaded: `spike audit verify` knows it by this name.
            Route::Restore => crate::protocol::audit::KEYLESS_ACTION,
            Route::Rotate => "operator.rotate",
            Route::Reencrypt => "operator.reencrypt",
            Route::Retire => "operator.retire",
            Route::Rekey => "operator.rekey",
        }
    }
}

/// Nexus's request handler.
pub struct Api {
    nexus: Arc<Nexus>,
    /// This instance's own SVID, whose state `/health` reports.
    identity: Arc<SvidSource>,
    /// Names each request in its audit line, its record and `X-Request-Id`.
    request_ids: super::audit::RequestIds,
}

impl Api {
    /// The handler of `nexus`, reporting `identity`'s state on `/health`.
    pub fn new(nexus: Arc<Nexus>, identity: Arc<SvidSource>) -> Api {
        Api {
            nexus,
            identity,
            request_ids: super::audit::RequestIds::new(),
        }
    }

    fn store(&self) -> &crate::store::Measured<crate::store::AnyStore> {
        &self.nexus.store
    }

    /// One API request once its route is known and the key is loaded: the caller is admitted
    /// for the route from its identity (and, for a workload, the policies that name it) before
    /// the body is read; then the body names the resource and the route runs with a grant.
    async fn dispatch(
        &self,
        route: Route,
        req: Request<Incoming>,
        caller: &SpiffeId,
        keys: &Arc<Keys>,
        resource: &mut String,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let trust = &self.nexus.config.identity.trust;
        let access = match route.need() {
            Need::Role(role) => {
                if trust.role_of(caller) != Some(role) {
                    return Err(ApiError::Unauthorized);
                }
                None
            }
            Need::Permission(want) => {
                Some(Access::admit(&self.nexus, keys, caller, trust, want).await?)
            }
        };
        // Routes whose resource is fixed are decided for it before the body is read.
        if let Some(access) = &access {
            match route {
                Route::PolicyPut | Route::PolicyGet | Route::PolicyDelete | Route::PolicyList => {
                    access.grant(policy::ACL_PATH)?;
                }
                Route::Encrypt | Route::Decrypt => {
                    access.grant(policy::CIPHER_PATH)?;
                }
                _ => {}
            }
        }
        let stream = req
            .headers()
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/octet-stream");
        let body = self.body(req).await?;
        match (route, access) {
            (Route::Recover, None) => {
                let _: Empty = parse(&body)?;
                // The answer is the recovery shards: a buffer wiped once it is written.
                let keys = &self.nexus.current(keys).await?;
                let shards = recovery::export(&self.nexus, keys).await?;
                Ok(transport::json_secret(StatusCode::OK, &shards))
            }
            (Route::Rekey, None) => {
                let r: wire::RekeyRequest = parse(&body)?;
                let keys = self.nexus.current(keys).await?;
                let sharing = super::rekey::Sharing::parse(
                    r.threshold.unwrap_or(keys.sharing.threshold),
                    &r.keepers.unwrap_or_else(|| {
                        keys.sharing.peers.iter().map(ToString::to_string).collect()
                    }),
                )
                .map_err(|reason| {
                    ApiError::operator(
                        wire::ErrorCode::ApiBadRequest,
                        format!("the new sharing is refused: {reason}"),
                    )
                })?;
                let done = super::rekey::rekey(&self.nexus, &keys, sharing).await?;
                ok(&wire::RekeyResponse {
                    previous_key_id: keys.key_id.clone(),
                    key_id: done.keys.key_id.clone(),
                    threshold: done.keys.sharing.threshold,
                    keepers: done
                        .keys
                        .sharing
                        .peers
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                    unconfirmed: done.unconfirmed,
                })
            }
            (Route::Rotate | Route::Reencrypt | Route::Retire, None) => {
                let ring = match route {
                    Route::Rotate => {
                        let r: wire::RotateRequest = parse(&body)?;
                        let ring = self.nexus.rotate(keys).await?;
                        if r.reencrypt {
                            self.nexus.reencrypt(keys).await?;
                        }
                        ring
                    }
                    Route::Reencrypt => {
                        let _: Empty = parse(&body)?;
                        self.nexus.reencrypt(keys).await?;
                        self.nexus.keyring(keys).await?
                    }
                    _ => {
                        let r: wire::RetireRequest = parse(&body)?;
                        *resource = r.id.to_string();
                        self.nexus.retire(keys, r.id).await?
                    }
                };
                ok(&wire::RotateResponse {
                    current_key: ring.current(),
                    keys: ring
                        .entries()
                        .iter()
                        .map(|e| wire::DataKeyInfo {
                            id: e.id,
                            state: e.state.as_str().to_string(),
                            created: e.created,
                        })
                        .collect(),
                })
            }
            (Route::Encrypt | Route::Decrypt, Some(access)) => {
                access.grant(policy::CIPHER_PATH)?;
                let ring = self.nexus.keyring(keys).await?;
                Ok(self.cipher(route, stream, &body, &ring))
            }
            (
                Route::PolicyPut | Route::PolicyGet | Route::PolicyDelete | Route::PolicyList,
                Some(access),
            ) => {
                self.policy_route(route, &body, keys, &access, resource)
                    .await
            }
            (_, Some(access)) => {
                self.secret_route(route, &body, keys, &access, resource)
                    .await
            }
            (_, None) => Err(ApiError::Internal(format!(
                "route {} has no access decision",
                route.name()
            ))),
        }
    }

    /// The secret routes.
    async fn secret_route(
        &self,
        route: Route,
        body: &[u8],
        keys: &Keys,
        access: &Access<'_>,
        resource: &mut String,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let store = self.store();
        let writers = &self.nexus.writers;
        let ring = self.nexus.keyring(keys).await?;
        let secret_keys = ring.secrets();
        match route {
            Route::SecretPut => {
                let r: wire::SecretPutRequest = parse(body)?;
                *resource = r.path.clone();
                secrets::validate_path(&r.path)?;
                let grant = access.grant(&r.path)?;
                let opts = secrets::PutOptions {
                    cas: r.cas,
                    request_id: r.request_id.as_deref(),
                    max_versions: self.nexus.config.max_secret_versions,
                };
                let version =
                    secrets::put(store, writers, secret_keys, &grant, &r.values, opts).await?;
                ok(&wire::SecretPutResponse { version })
            }
            Route::SecretGet => {
                let r: wire::SecretGetRequest = parse(body)?;
                *resource = r.path.clone();
                secrets::validate_path(&r.path)?;
                let grant = access.grant(&r.path)?;
                let (data, version) = secrets::read(store, secret_keys, &grant, r.version).await?;
                ok(&wire::SecretGetResponse { data, version })
            }
            Route::SecretDelete | Route::SecretUndelete => {
                let r: wire::SecretVersionsRequest = parse(body)?;
                *resource = r.path.clone();
                secrets::validate_path(&r.path)?;
                let grant = access.grant(&r.path)?;
                if route == Route::SecretDelete {
                    secrets::delete(store, writers, secret_keys, &grant, &r.versions).await?;
                } else {
                    secrets::undelete(store, writers, secret_keys, &grant, &r.versions).await?;
                }
                ok(&Empty {})
            }
            Route::SecretMetadata => {
                let r: wire::SecretGetRequest = parse(body)?;
                *resource = r.path.clone();
                secrets::validate_path(&r.path)?;
                let grant = access.grant(&r.path)?;
                ok(&secrets::metadata(store, secret_keys, &grant, r.version).await?)
            }
            Route::SecretList => {
                let r: wire::SecretListRequest = parse(body)?;
                let prefix = r.prefix.unwrap_or_default();
                *resource = prefix.clone();
                let listing = access.listing()?;
                let keys = secrets::list(store, &listing, &prefix).await?;
                ok(&wire::SecretListResponse { keys })
            }
            _ => Err(ApiError::Internal(format!(
                "{} is not a secret route",
                route.name()
            ))),
        }
    }

    /// The policy routes, all authorised on the reserved ACL path.
    async fn policy_route(
        &self,
        route: Route,
        body: &[u8],
        keys: &Keys,
        access: &Access<'_>,
        resource: &mut String,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let store = self.store();
        let book = &self.nexus.policies;
        let ring = self.nexus.keyring(keys).await?;
        let key: &dyn super::book::BookKey = &*ring;
        let grant = access.grant(policy::ACL_PATH)?;
        match route {
            Route::PolicyPut => {
                let r: wire::PolicyPutRequest = parse(body)?;
                *resource = r.name.clone();
                policy::put(store, book, key, &grant, &r).await?;
                ok(&Empty {})
            }
            Route::PolicyGet => {
                let r: wire::PolicyIdRequest = parse(body)?;
                *resource = r.id.clone();
                ok(&policy::get(store, book, key, &grant, &r.id).await?.to_api())
            }
            Route::PolicyDelete => {
                let r: wire::PolicyIdRequest = parse(body)?;
                *resource = r.id.clone();
                policy::delete(store, book, key, &grant, &r.id).await?;
                ok(&Empty {})
            }
            Route::PolicyList => {
                let r: wire::PolicyListRequest = parse(body)?;
                let policies = policy::all(store, book, key, &grant)
                    .await?
                    .into_iter()
                    // Exact-string filters, the SPIFFE-ID one first; an empty string is no
                    // filter (SPIKE's SDK sends both fields, empty when unset).
                    .filter(|p| {
                        let set = |f: &Option<String>| f.clone().filter(|f| !f.is_empty());
                        match (set(&r.spiffeid_pattern), set(&r.path_pattern)) {
                            (Some(id), _) => p.spiffeid_pattern == id,
                            (None, Some(path)) => p.path_pattern == path,
                            (None, None) => true,
                        }
                    })
                    .map(|p| p.to_api())
                    .collect();
                ok(&wire::PolicyListResponse { policies })
            }
            _ => Err(ApiError::Internal(format!(
                "{} is not a policy route",
                route.name()
            ))),
        }
    }

    fn cipher(
        &self,
        route: Route,
        stream: bool,
        body: &[u8],
        ring: &Keyring,
    ) -> Response<Full<Bytes>> {
        let limit = self.nexus.config.max_cipher_bytes;
        const OCTETS: &str = "application/octet-stream";
        let result = match (route, stream) {
            (Route::Encrypt, true) => cipher::encrypt(ring, body, limit).map(|(nonce, ct)| {
                transport::bytes(StatusCode::OK, OCTETS, cipher::frame(&nonce, &ct))
            }),
            (Route::Decrypt, true) => cipher::unframe(body)
                .and_then(|(v, n, c)| cipher::decrypt(ring, v, n, c, limit))
                .map(|plain| transport::bytes(StatusCode::OK, OCTETS, plain.to_vec())),
            (Route::Encrypt, false) => parse::<wire::EncryptRequest>(body)
                .and_then(|r| cipher::encrypt(ring, &r.plaintext, limit))
                .map(|(nonce, ct)| {
                    transport::json(
                        StatusCode::OK,
                        &wire::EncryptResponse {
                            version: wire::CIPHER_VERSION,
                            nonce: nonce.to_vec(),
                            ciphertext: ct,
                        },
                    )
                }),
            (_, false) => parse::<wire::DecryptRequest>(body)
                .and_then(|r| cipher::decrypt(ring, r.version, &r.nonce, &r.ciphertext, limit))
                .map(|plain| {
                    transport::json(
                        StatusCode::OK,
                        &wire::DecryptResponse {
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

/// Decodes a JSON request body. The error says what kind of mistake and where, never what the
/// body held: serde's own messages quote the input, which may be a secret value.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "not valid JSON",
            serde_json::error::Category::Data => "not the expected fields and types",
            serde_json::error::Category::Eof => "truncated",
        };
        ApiError::BadRequest(format!(
            "request body is {kind} (line {}, column {})",
            e.line(),
            e.column()
        ))
    })
}

fn ok<T: Serialize>(body: &T) -> Result<Response<Full<Bytes>>, ApiError> {
    Ok(transport::json(StatusCode::OK, body))
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let code = e.code();
    match e {
        // Operator routes say why (superuser callers; nothing secret in the reason).
        ApiError::Operator { reason, .. } => transport::json(
            code.status(),
            &wire::ErrorBody {
                err: code.as_str().to_string(),
                reason: Some(reason.clone()),
            },
        ),
        _ => transport::error(code.status(), code.as_str()),
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
    /// How the Keeper shards are drawn from the key: `rejection_sampling` (SPIKE main, circl
    /// >= 1.6.2) or `hash_to_scalar` (SPIKE <= v0.8.0, circl 1.6.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    shard_derivation: Option<String>,
    threshold: u8,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    inconsistent_keepers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// This instance's SVID: `ready`, or `svid_expired` (then `status` says so too and the
    /// answer is 503: peers refuse an expired certificate).
    identity: &'static str,
    /// When the SVID in use expires (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    svid_expires: Option<String>,
    /// The audit file: `ok`, `failing` or `blocked` (absent when there is none).
    #[serde(skip_serializing_if = "Option::is_none")]
    audit: Option<&'static str>,
    /// Whether the current root key's recovery shards have been exported: `exported`, or
    /// `not_exported` (never, or not since a rekey replaced the key: run `spike recover
    /// export`). Absent while no key is loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery_shards: Option<&'static str>,
}

impl Health {
    /// An answer saying `status`, with nothing else known yet.
    fn new(status: &'static str, backend: &'static str, threshold: u8) -> Health {
        Health {
            status,
            backend,
            key_id: None,
            keepers_with_shards: None,
            shard_derivation: None,
            threshold,
            inconsistent_keepers: Vec::new(),
            reason: None,
            identity: "ready",
            svid_expires: None,
            audit: None,
            recovery_shards: None,
        }
    }
}

impl Api {
    async fn health(&self) -> Response<Full<Bytes>> {
        let nexus = &self.nexus;
        let mut health = Health::new("ready", nexus.store.backend(), nexus.sharing().threshold);
        health.inconsistent_keepers = nexus.inconsistent_keepers();
        let audit = nexus.audit.health();
        if audit != super::audit::Health::Off {
            health.audit = Some(audit.as_str());
        }
        let state = self.identity.state();
        health.identity = state.name();
        if let IdentityState::Ready { not_after } | IdentityState::Expired { not_after } = state {
            health.svid_expires = Some(crate::protocol::nexus::rfc3339(
                not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
            ));
        }
        if !state.is_ready() {
            health.status = state.name();
            health.reason = self.identity.agent_problem().map(|p| p.to_string());
            return transport::json(StatusCode::SERVICE_UNAVAILABLE, &health);
        }
        let status = match nexus.keys() {
            Some(keys) => {
                health.key_id = Some(keys.key_id.clone());
                health.shard_derivation = Some(keys.derivation.to_string());
                let checked = async {
                    nexus.store.ping().await?;
                    super::rekey::exported(&nexus.store, &keys.root).await
                };
                match tokio::time::timeout(HEALTH_STORE_TIMEOUT, checked).await {
                    Ok(Ok(exported)) => {
                        nexus.metrics.recovery_exported(exported);
                        health.recovery_shards =
                            Some(if exported { "exported" } else { "not_exported" });
                        StatusCode::OK
                    }
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
                match phase {
                    Phase::AwaitingKeepers { have, .. } => health.keepers_with_shards = Some(have),
                    Phase::RestoreIncomplete => {
                        health.reason = Some(
                            "the store holds an unfinished backup restore; run spike backup restore again to finish it"
                                .into(),
                        )
                    }
                    Phase::KeyringRefused => {
                        health.reason = Some(
                            "the store's keyring does not open under the root key (edited, or another deployment's); restore it from a backup"
                                .into(),
                        )
                    }
                    _ => {}
                }
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        // Fail-closed with a sink that does not write: every request would be refused, so the
        // load balancer should send them elsewhere.
        if status == StatusCode::OK
            && let Some(e) = nexus.audit.refuses()
        {
            health.status = "audit_unavailable";
            health.reason = Some(e.to_string());
            return transport::json(StatusCode::SERVICE_UNAVAILABLE, &health);
        }
        transport::json(status, &health)
    }
}

/// The handler a Nexus serves with from the moment it listens: until its store is open it
/// answers `/health` and every route with `store_unavailable` (503); then it hands every
/// request to the [`Api`].
pub struct Gate {
    api: std::sync::OnceLock<Api>,
    backend: &'static str,
    /// The Shamir threshold, which `/health` always reports.
    threshold: u8,
    /// Counts connections from the start, and the requests the gate answers itself.
    metrics: Arc<NexusMetrics>,
    /// Why the store is not open yet (no credentials: store errors never carry any).
    reason: std::sync::Mutex<Option<String>>,
}

impl Gate {
    /// A closed gate in front of a store of `backend` (Shamir `threshold`), counting into
    /// `metrics`.
    pub fn new(backend: &'static str, threshold: u8, metrics: Arc<NexusMetrics>) -> Gate {
        Gate {
            api: std::sync::OnceLock::new(),
            backend,
            threshold,
            metrics,
            reason: std::sync::Mutex::new(None),
        }
    }

    /// Says why the store is not open yet.
    pub fn set_reason(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }

    /// Opens the gate: from now on `api` answers.
    pub fn open(&self, api: Api) {
        let _ = self.api.set(api);
    }
}

impl Handler for Gate {
    fn privileged(&self, peer: &Peer) -> bool {
        // Before the store is open nothing but `/health` answers, and callers without a
        // certificate have their own allowance for it: nobody needs the reserve.
        self.api.get().is_some_and(|api| api.privileged(peer))
    }

    fn connections(&self) -> Option<&Connections> {
        Some(&self.metrics.connections)
    }

    async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        if let Some(api) = self.api.get() {
            return api.handle(req, peer).await;
        }
        let started = Instant::now();
        let health = req.uri().path() == wire::HEALTH_PATH;
        let resp = self.closed(health);
        let label = if health { HEALTH } else { NO_ROUTE };
        self.metrics
            .request(label, label, resp.status().as_u16(), started.elapsed());
        resp
    }
}

/// The `route` and `action` labels of `/health` requests.
const HEALTH: &str = "health";
/// The `route` and `action` labels of requests that named no known route.
const NO_ROUTE: &str = "none";

impl Gate {
    /// The answer while the store is not open.
    fn closed(&self, health: bool) -> Response<Full<Bytes>> {
        if health {
            let reason = self
                .reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut health = Health::new("store_unavailable", self.backend, self.threshold);
            health.reason = Some(reason.unwrap_or_else(|| "opening the backing store".into()));
            return transport::json(StatusCode::SERVICE_UNAVAILABLE, &health);
        }
        error_response(&ApiError::Store(crate::store::Error::Unavailable {
            backend: self.backend,
            reason: "the backing store is not open yet".into(),
        }))
    }
}

impl Handler for Api {
    /// Operators (superuser, recover, restore) may use the reserved connections: a workload
    /// identity that holds every ordinary connection does not lock out the people who run
    /// Nexus. Callers without a certificate never do (they have their own small allowance, see
    /// [`crate::transport::Limits::anonymous_connections`]).
    fn privileged(&self, peer: &Peer) -> bool {
        peer.id.as_ref().is_some_and(|id| {
            matches!(
                self.nexus.config.identity.trust.role_of(id),
                Some(Role::Superuser | Role::Recover | Role::Restore)
            )
        })
    }

    async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let mut labels = (NO_ROUTE, NO_ROUTE);
        let resp = self.respond(req, peer, &mut labels).await;
        self.nexus.metrics.request(
            labels.0,
            labels.1,
            resp.status().as_u16(),
            started.elapsed(),
        );
        resp
    }
}

impl Api {
    /// Answers one request; sets `labels` (route, action) for the request metrics once the
    /// route is known.
    async fn respond(
        &self,
        req: Request<Incoming>,
        peer: Peer,
        labels: &mut (&'static str, &'static str),
    ) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if path == wire::HEALTH_PATH
            && (req.method() == Method::GET || req.method() == Method::HEAD)
        {
            *labels = (HEALTH, HEALTH);
            return self.health().await;
        }
        if req.method() != Method::POST {
            return error_response(&ApiError::BadRequest("only POST".into()));
        }
        let Some(caller) = peer.id.as_ref() else {
            return error_response(&ApiError::Unauthorized);
        };
        let started = Instant::now();
        let route = match Route::find(&path, req.uri().query()) {
            Ok(route) => route,
            // Recorded too: an authenticated caller probing for routes leaves a trace.
            Err(e) => return self.audited(caller, NO_ROUTE, &path, started, Err(e)).await,
        };
        *labels = (route.endpoint(), route.name());
        // Fail-closed: nothing is done that could not be audited.
        if let Some(e) = self.nexus.audit.refuses() {
            tracing::error!(caller = %caller, action = route.name(), error = %e, "request refused: the audit trail is not being written");
            return error_response(&ApiError::Audit(e));
        }
        if route == Route::Restore {
            // The escape hatch works without a key (that is its point); only restore operators.
            let result = self.restore(req, caller).await;
            return self
                .audited(caller, route.name(), "", started, result)
                .await;
        }
        let Some(keys) = self.nexus.keys() else {
            let refused = Err(ApiError::NotReady);
            return self
                .audited(caller, route.name(), "", started, refused)
                .await;
        };
        let mut resource = String::new();
        let result = self
            .dispatch(route, req, caller, &keys, &mut resource)
            .await;
        self.audited(caller, route.name(), &resource, started, result)
            .await
    }
}

impl Api {
    /// Turns a result into a response, logging failures and writing the audit line and record.
    /// Fail-closed, a record that cannot be written turns the answer into 503.
    async fn audited(
        &self,
        caller: &SpiffeId,
        action: &'static str,
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
                            action,
                            backend = self.nexus.store.backend(),
                            error = %e,
                            "request failed"
                        );
                    }
                    _ => {
                        tracing::info!(caller = %caller, action, error = %e, "request refused")
                    }
                }
                error_response(&e)
            }
        };
        let request_id = self.request_ids.next();
        let status = resp.status().as_u16();
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        // Whole, so the record says which secret or policy (a valid path is at most
        // MAX_PATH_LEN bytes); bounded for what a refused request named.
        let resource = escape_limited(resource, AUDIT_RESOURCE_MAX);
        tracing::info!(
            target: "spike::audit",
            caller = %caller,
            action,
            resource = %resource,
            status,
            micros,
            request_id = %request_id,
            "audit"
        );
        // The log stream reports no failure: every line counts as written.
        self.nexus
            .metrics
            .audit_record(AuditSink::Stderr, AuditResult::Written);
        let written = self
            .nexus
            .audit
            .request(
                self.nexus.keys(),
                &request_id,
                caller.as_str(),
                action,
                &resource,
                status,
                micros,
            )
            .await;
        let sink = self.nexus.audit.health();
        if sink != super::audit::Health::Off {
            let result = match written {
                Ok(()) => AuditResult::Written,
                Err(_) => AuditResult::Failed,
            };
            self.nexus.metrics.audit_record(AuditSink::File, result);
            self.nexus
                .metrics
                .audit_sink_health(AuditSink::File, sink == super::audit::Health::Ok);
        }
        let mut resp = match written {
            Ok(()) => resp,
            Err(e) => {
                tracing::error!(caller = %caller, action, %request_id, error = %e, "answer withheld: its audit record was not written");
                error_response(&ApiError::Audit(e))
            }
        };
        if let Ok(value) = hyper::header::HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", value);
        }
        resp
    }

    /// `/v1/operator/restore`: restore-role operators only, with or without a key.
    async fn restore(
        &self,
        req: Request<Incoming>,
        caller: &SpiffeId,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        if self.nexus.config.identity.trust.role_of(caller) != Some(Role::Restore) {
            return Err(ApiError::Unauthorized);
        }
        let body = self.body(req).await?;
        let parsed = parse::<wire::RestoreRequest>(&body);
        // The body holds a shard (the parsed request wipes its own copy when dropped).
        transport::wipe_body(body);
        ok(&recovery::restore(&self.nexus, &parsed?).await?)
    }

    /// The request body, within the size limit and the body deadline.
    async fn body(&self, req: Request<Incoming>) -> Result<Bytes, ApiError> {
        let cfg = &self.nexus.config;
        transport::read_body(req.into_body(), cfg.max_body_bytes, cfg.server.body_timeout)
            .await
            .map_err(|e| match e {
                transport::BodyError::TooLarge(_) => ApiError::TooLarge,
                other => ApiError::BadRequest(other.to_string()),
            })
    }
}

/// Characters of a resource the audit line and record keep: more than any valid secret path
/// ([`crate::protocol::secret::MAX_PATH_LEN`]) or policy name.
const AUDIT_RESOURCE_MAX: usize = 1024;

/// A caller-supplied `text` made safe for a log line or audit record in any format: control
/// characters (line breaks, terminal escapes) escaped, and at most `max` characters kept (`…`
/// when cut).
fn escape_limited(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_actions() {
        let find = |path: &str, query: Option<&str>| Route::find(path, query).ok();
        assert_eq!(find("/v1/store/secrets", None), Some(Route::SecretPut));
        assert_eq!(find("/v1/store/secrets", Some("")), Some(Route::SecretPut));
        assert_eq!(
            find("/v1/store/secrets", Some("action=")),
            Some(Route::SecretPut)
        );
        assert_eq!(
            find("/v1/store/secrets", Some("action=get")),
            Some(Route::SecretGet)
        );
        assert_eq!(
            find("/v1/acl/policy", Some("action=list")),
            Some(Route::PolicyList)
        );
        assert_eq!(find("/v1/store/secrets/", None), None);
        assert_eq!(find("/v1/store/secrets/metadata", None), None);
        // Nothing but SPIKE's empty action is a put: unknown, misspelt, encoded, repeated or
        // extra parameters are refused.
        for query in [
            "action=read",
            "action=GET",
            "Action=get",
            "act%69on=get",
            "action=%67et",
            "actio=get",
            "action=get&action=get",
            "x=1&action=list",
            "action=list&x=1",
            "action",
            "=get",
            "&",
        ] {
            assert_eq!(find("/v1/store/secrets", Some(query)), None, "{query}");
        }
    }

    #[test]
    fn log_safe_escapes_line_breaks_and_terminal_escapes() {
        let log_safe = |text: &str| escape_limited(text, 256);
        assert_eq!(log_safe("a\nb"), "a\\nb");
        assert_eq!(log_safe("x\u{1b}[31m"), "x\\u{1b}[31m");
        assert_eq!(log_safe("plain/path"), "plain/path");
        assert_eq!(log_safe(&"a".repeat(300)).chars().count(), 257);
    }
}
