//! A typed client for Nexus's API ([`crate::protocol::nexus`]), as the CLI commands use it.
//!
//! [`NexusClient::from_env`] builds it from the client environment: `SPIKE_NEXUS_API_URL` (one
//! URL or a comma-separated list), `SPIKE_TRUST_ROOT` and the caller's SVID files
//! (`SPIKE_SVID_DIR` or the single-file overrides). The server must prove the Nexus SPIFFE ID.
//!
//! Failover. Every URL is resolved to all its addresses (DNS round-robin: each address is an
//! instance), and the (URL, address) pairs are tried in turn, starting at a random position so
//! that many clients spread over the instances:
//! - [`transport::client::Error::Unsent`] (nothing reached the server: refused, connect timeout of
//!   `SPIKE_HTTP_CLIENT_DIALER_TIMEOUT`, failed handshake) or a `503` answer (this instance has
//!   no root key yet, or its store is down): try the next address, for every request.
//! - [`transport::client::Error::NoAnswer`] (the request may have reached a server): try the next address
//!   only when a replay cannot apply the request twice: reads, lists and the cipher change
//!   nothing; a secret put carries a `request_id` that Nexus remembers, so a replay returns the
//!   version the first one made; delete, undelete and policy put leave the same state when
//!   replayed, and a `404` to a replayed policy delete or undelete means the first one was
//!   applied. Only an operator's restore stops at `NoAnswer`.
//! - Any other answer is final.
//!
//! An address that failed (either way) is remembered for [`BACKOFF`] within the process and
//! tried only after every other address. Up to [`ROUNDS`] passes are made over the list, with
//! a short pause between them, so a single load balancer address gets a second chance when the
//! instance behind it died mid-request.
//!
//! When every address fails, the error is the last `503` answer if there was one (it says more
//! than a refused connection), else every transport failure, in the order tried.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{StatusCode, Uri};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::client::config;
use crate::identity::{self, ExpectedPeer, Role, SpiffeId};
use crate::platform::env::{self, Source};
use crate::protocol::nexus::{
    self as wire, DECRYPT_PATH, DecryptRequest, DecryptResponse, ENCRYPT_PATH, EncryptRequest,
    EncryptResponse, ErrorCode, POLICY_PATH, Policy, PolicyIdRequest, PolicyListRequest,
    PolicyListResponse, PolicyPutRequest, SECRET_METADATA_PATH, SECRETS_PATH, SecretGetRequest,
    SecretGetResponse, SecretListRequest, SecretListResponse, SecretMetadataResponse,
    SecretPutRequest, SecretPutResponse, SecretVersionsRequest,
};
use crate::transport::{self, HttpsClient, Timeouts};

/// Why a call to Nexus failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client environment is incomplete or invalid (URLs, trust domain, SVID paths).
    #[error("{0}")]
    Config(#[from] env::Error),
    /// The caller's SVID could not be loaded, or no TLS configuration could be built from it.
    #[error("{0}")]
    Identity(#[from] identity::Error),
    /// No URL gave an answer. Holds every attempt, in order; never empty.
    #[error("{}", join_attempts(.attempts))]
    Transport {
        /// Every address tried, with why it failed.
        attempts: Vec<transport::client::Error>,
    },
    /// Nexus answered with an error: `code` is the `err` of its `{"err": code}` body (or the
    /// text of a plain-text body, as SPIKE's cipher stream mode sends).
    #[error("Nexus at {url} answered {status} ({code})")]
    Api {
        /// The Nexus that answered.
        url: String,
        /// Its HTTP status.
        status: StatusCode,
        /// Its error code (`err`).
        code: String,
        /// Why, when it says (`reason`, ours for operator routes).
        reason: Option<String>,
    },
    /// Nexus answered 200 with a body that is not the expected shape.
    #[error("unexpected answer from Nexus at {url}: {reason}")]
    Malformed {
        /// The Nexus that answered.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },
}

impl Error {
    /// The `err` code of an API error, if this is one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Api { code, .. } => ErrorCode::parse(code),
            _ => None,
        }
    }
}

fn join_attempts(attempts: &[transport::client::Error]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Result of a call to Nexus.
pub type Result<T> = std::result::Result<T, Error>;

/// Whether a request may be replayed on another Nexus after it may have reached one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// Reads and the cipher: no stored state changes, so a replay is harmless.
    None,
    /// Changes stored state, but a replay leaves the state the first one made (a put with a
    /// request id, delete, undelete, policy put and delete).
    Idempotent,
    /// Changes stored state: replayed only when it cannot have been sent.
    Write,
    /// A [`Effect::Write`] whose every answer is final, `503` included: a rekey that answered
    /// 503 may have changed the root key, and sent again elsewhere it would replace that one.
    Once,
}

/// How long an address that failed is tried only after the others.
pub const BACKOFF: Duration = Duration::from_secs(5);
/// Passes over the address list before giving up.
pub const ROUNDS: u32 = 3;
/// Pause before the second pass (twice that before the third).
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// Addresses that failed recently in this process, with when.
static FAILED: Mutex<BTreeMap<SocketAddr, Instant>> = Mutex::new(BTreeMap::new());

fn failed_recently(addr: &SocketAddr, now: Instant) -> bool {
    FAILED
        .lock()
        .map(|f| {
            f.get(addr)
                .is_some_and(|at| now.saturating_duration_since(*at) < BACKOFF)
        })
        .unwrap_or(false)
}

fn mark(addr: SocketAddr, failed: bool) {
    if let Ok(mut f) = FAILED.lock() {
        let now = Instant::now();
        f.retain(|_, at| now.saturating_duration_since(*at) < BACKOFF);
        if failed {
            f.insert(addr, now);
        } else {
            f.remove(&addr);
        }
    }
}

/// `items` rotated to start at `start`, then those that failed recently moved to the end
/// (each group keeping its order).
fn order<T: Clone>(items: &[T], start: usize, failed: impl Fn(&T) -> bool) -> Vec<T> {
    let n = items.len();
    let rotated = (0..n).map(|i| items[(start + i) % n.max(1)].clone());
    let (fresh, stale): (Vec<T>, Vec<T>) = rotated.partition(|x| !failed(x));
    fresh.into_iter().chain(stale).collect()
}

/// `n` random bytes from the system's secure generator.
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // Should the system generator fail, the clock's nanoseconds stand in: the offset only
    // spreads load, and a request id only has to differ from this path's other recent ids.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes();
        for (b, n) in bytes.iter_mut().zip(nanos.iter().cycle()) {
            *b = *n;
        }
    }
    bytes
}

/// A fresh `request_id` for one logical put: 128 random bits as hex.
pub fn new_request_id() -> String {
    random_bytes::<16>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The result of a send, and whether the request was sent again after a `NoAnswer` (so an
/// error may be the echo of the first one having been applied).
struct Outcome {
    result: Result<(String, Bytes)>,
    replayed: bool,
}

const JSON: &str = "application/json";
const OCTET_STREAM: &str = "application/octet-stream";

/// A client for one or more Nexus instances of one deployment.
pub struct NexusClient {
    /// Shared TLS client presenting the caller's SVID.
    http: HttpsClient,
    /// `SPIKE_NEXUS_API_URL`, in the order they are tried.
    urls: Vec<Uri>,
    /// The caller's own SPIFFE ID, from its SVID: error messages name it.
    caller: SpiffeId,
}

impl NexusClient {
    /// Builds a client from the client environment (see the module docs); with the Workload API,
    /// waits for the caller's SVID.
    pub async fn from_env(env: &impl Source) -> Result<NexusClient> {
        let urls = config::api_urls(env)?;
        let ident = crate::identity::IdentityConfig::from_source(env)?;
        let source = ident.open().await?;
        let tls = identity::client_config_for(
            Some(&source),
            None,
            &ident.trust,
            ExpectedPeer::Role(Role::Nexus),
        )?;
        let caller = source.current().id().clone();
        let timeouts = Timeouts {
            connect: config::dialer_timeout(env)?,
            ..Timeouts::default()
        };
        Ok(NexusClient::new(
            HttpsClient::new(tls, timeouts),
            urls,
            caller,
        ))
    }

    /// A client over an existing HTTPS client. `urls` must not be empty.
    pub fn new(http: HttpsClient, urls: Vec<Uri>, caller: SpiffeId) -> NexusClient {
        NexusClient { http, urls, caller }
    }

    /// The SPIFFE ID this client presents.
    pub fn caller(&self) -> &SpiffeId {
        &self.caller
    }

    /// The Nexus URLs, in the order they are tried.
    pub fn urls(&self) -> &[Uri] {
        &self.urls
    }

    /// Writes a new version of `path`; returns its number. `cas`: the version that must be
    /// current (0: the path must hold no live version), else 409 `api_conflict`. The put
    /// carries a fresh request id, so it is resent after a lost answer without writing twice.
    pub async fn secret_put(
        &self,
        path: &str,
        values: BTreeMap<String, String>,
        cas: Option<u64>,
    ) -> Result<u64> {
        self.secret_put_with_id(path, values, cas, new_request_id())
            .await
    }

    /// [`NexusClient::secret_put`] with the caller's request id: sending the same id again
    /// (from any client, to any instance) returns the version the first put made.
    pub async fn secret_put_with_id(
        &self,
        path: &str,
        values: BTreeMap<String, String>,
        cas: Option<u64>,
        request_id: String,
    ) -> Result<u64> {
        let req = SecretPutRequest {
            path: path.to_string(),
            values,
            cas,
            request_id: Some(request_id),
        };
        let resp: SecretPutResponse = self.json(SECRETS_PATH, &req, Effect::Idempotent).await?;
        Ok(resp.version)
    }

    /// Reads `version` of `path` (`None`: the current version).
    pub async fn secret_get(&self, path: &str, version: Option<u64>) -> Result<SecretGetResponse> {
        let req = SecretGetRequest {
            path: path.to_string(),
            version,
        };
        self.json(&action(SECRETS_PATH, "get"), &req, Effect::None)
            .await
    }

    /// Soft-deletes `versions` of `path` (empty: the current version).
    pub async fn secret_delete(&self, path: &str, versions: Vec<u64>) -> Result<()> {
        self.versions_call("delete", path, versions).await
    }

    /// Restores soft-deleted `versions` of `path` (empty: the current or latest deleted one).
    /// A `404` to a replay (after a lost answer) counts as done: the first one restored them.
    pub async fn secret_undelete(&self, path: &str, versions: Vec<u64>) -> Result<()> {
        self.versions_call("undelete", path, versions).await
    }

    async fn versions_call(&self, verb: &str, path: &str, versions: Vec<u64>) -> Result<()> {
        let req = SecretVersionsRequest {
            path: path.to_string(),
            versions,
        };
        self.idempotent_call(&action(SECRETS_PATH, verb), &req)
            .await
    }

    /// Sends a request whose replay leaves the same state; a `404` to a replay is success
    /// (only undelete and policy delete answer 404 to their own earlier success).
    async fn idempotent_call<Req: Serialize>(&self, path: &str, req: &Req) -> Result<()> {
        let body = encode(path, req)?;
        let outcome = self.attempt(path, JSON, body, Effect::Idempotent).await;
        match outcome.result {
            Ok(_) => Ok(()),
            Err(Error::Api { status, .. })
                if outcome.replayed && status == StatusCode::NOT_FOUND =>
            {
                tracing::debug!("{path}: 404 to a replay; the first attempt was applied");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The secret paths the caller may list, under `prefix` if given.
    pub async fn secret_list(&self, prefix: Option<&str>) -> Result<SecretListResponse> {
        let req = SecretListRequest {
            prefix: prefix.map(str::to_string),
        };
        self.json(&action(SECRETS_PATH, "list"), &req, Effect::None)
            .await
    }

    /// The versions and metadata of `path`.
    pub async fn secret_metadata(
        &self,
        path: &str,
        version: Option<u64>,
    ) -> Result<SecretMetadataResponse> {
        let req = SecretGetRequest {
            path: path.to_string(),
            version,
        };
        self.json(&action(SECRET_METADATA_PATH, "get"), &req, Effect::None)
            .await
    }

    /// Creates or replaces the policy `policy.name`.
    pub async fn policy_put(&self, policy: &PolicyPutRequest) -> Result<()> {
        let _: wire::Empty = self.json(POLICY_PATH, policy, Effect::Idempotent).await?;
        Ok(())
    }

    /// The policy called `name`.
    pub async fn policy_get(&self, name: &str) -> Result<Policy> {
        let req = PolicyIdRequest {
            id: name.to_string(),
        };
        self.json(&action(POLICY_PATH, "get"), &req, Effect::None)
            .await
    }

    /// Deletes the policy called `name`. A `404` to a replay (after a lost answer) counts as
    /// done: the first one deleted it.
    pub async fn policy_delete(&self, name: &str) -> Result<()> {
        let req = PolicyIdRequest {
            id: name.to_string(),
        };
        self.idempotent_call(&action(POLICY_PATH, "delete"), &req)
            .await
    }

    /// Every policy, or those whose patterns equal the filter's.
    pub async fn policy_list(&self, filter: &PolicyListRequest) -> Result<PolicyListResponse> {
        self.json(&action(POLICY_PATH, "list"), filter, Effect::None)
            .await
    }

    /// Encrypts `plaintext` in stream mode: the answer is `0x01 ‖ nonce ‖ ciphertext`.
    pub async fn encrypt_stream(&self, plaintext: Vec<u8>) -> Result<Vec<u8>> {
        let (_, body) = self
            .send(ENCRYPT_PATH, OCTET_STREAM, plaintext, Effect::None)
            .await?;
        Ok(body.to_vec())
    }

    /// Decrypts a stream-mode ciphertext (`0x01 ‖ nonce ‖ ciphertext`).
    pub async fn decrypt_stream(&self, ciphertext: Vec<u8>) -> Result<Vec<u8>> {
        let (_, body) = self
            .send(DECRYPT_PATH, OCTET_STREAM, ciphertext, Effect::None)
            .await?;
        Ok(body.to_vec())
    }

    /// Encrypts `plaintext` in JSON mode.
    pub async fn encrypt_json(&self, plaintext: Vec<u8>) -> Result<EncryptResponse> {
        let req = EncryptRequest {
            plaintext,
            algorithm: None,
        };
        self.json(ENCRYPT_PATH, &req, Effect::None).await
    }

    /// Decrypts a JSON-mode ciphertext; returns the plaintext.
    pub async fn decrypt_json(&self, req: &DecryptRequest) -> Result<Vec<u8>> {
        let resp: DecryptResponse = self.json(DECRYPT_PATH, req, Effect::None).await?;
        Ok(resp.plaintext)
    }

    /// The recovery shards of the root key (recover-role operators only).
    pub async fn recover(&self) -> Result<wire::RecoverResponse> {
        self.json(wire::RECOVER_PATH, &wire::Empty {}, Effect::None)
            .await
    }

    /// Sends one recovery shard towards a restore. Restore state lives in one instance's
    /// memory, so build this client with that instance's URL only.
    pub async fn restore(&self, req: &wire::RestoreRequest) -> Result<wire::RestoreResponse> {
        self.json(wire::RESTORE_PATH, req, Effect::Write).await
    }

    /// Adds a data key to the keyring (superuser only), then starts a re-encryption pass if
    /// `reencrypt`.
    pub async fn rotate(&self, reencrypt: bool) -> Result<wire::RotateResponse> {
        let req = wire::RotateRequest { reencrypt };
        self.json(wire::ROTATE_PATH, &req, Effect::Write).await
    }

    /// Starts a re-encryption pass (superuser only).
    pub async fn reencrypt(&self) -> Result<wire::RotateResponse> {
        self.json(wire::REENCRYPT_PATH, &wire::Empty {}, Effect::Idempotent)
            .await
    }

    /// Retires a data key no record names (superuser only).
    pub async fn retire(&self, id: u32) -> Result<wire::RotateResponse> {
        let req = wire::RetireRequest { id };
        self.json(wire::RETIRE_PATH, &req, Effect::Idempotent).await
    }

    /// Replaces the root key and its sharing (superuser only). Not retried on another
    /// instance: a second rekey would be refused while the first runs.
    pub async fn rekey(&self, req: &wire::RekeyRequest) -> Result<wire::RekeyResponse> {
        self.json(wire::REKEY_PATH, req, Effect::Once).await
    }

    /// The same client aimed at other Nexus URLs.
    pub fn with_urls(self, urls: Vec<Uri>) -> NexusClient {
        NexusClient { urls, ..self }
    }

    /// POSTs `req` as JSON and parses a 200 answer as `T`.
    async fn json<Req: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
        effect: Effect,
    ) -> Result<T> {
        let body = encode(path, req)?;
        let (url, reply) = self.send(path, JSON, body, effect).await?;
        serde_json::from_slice(&reply).map_err(|e| Error::Malformed {
            url,
            reason: format!("the body is not the expected JSON ({e})"),
        })
    }

    /// Sends one request, failing over (see the module docs); returns the answering URL and
    /// the body of its 200 answer.
    async fn send(
        &self,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
        effect: Effect,
    ) -> Result<(String, Bytes)> {
        self.attempt(path, content_type, body, effect).await.result
    }

    /// Every (URL, address) pair to try, in list order, each with its place in that order;
    /// resolution failures go to `attempts`.
    async fn candidates(
        &self,
        attempts: &mut BTreeMap<Place, transport::client::Error>,
    ) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = Vec::new();
        for (i, base) in self.urls.iter().enumerate() {
            match self.http.resolve(base).await {
                Ok(addrs) => {
                    for (j, addr) in addrs.into_iter().enumerate() {
                        if !out.iter().any(|c| c.base == *base && c.addr == addr) {
                            out.push(Candidate {
                                place: (i, j),
                                base: base.clone(),
                                addr,
                            });
                        }
                    }
                }
                Err(e) => {
                    attempts.insert((i, 0), e);
                }
            }
        }
        out
    }

    async fn attempt(
        &self,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
        effect: Effect,
    ) -> Outcome {
        // The last failure of each address, in list order: a message names each once.
        let mut attempts = BTreeMap::new();
        let mut unavailable = None;
        let mut maybe_sent = false;
        let mut replayed = false;
        let transport = |attempts: BTreeMap<Place, transport::client::Error>| Error::Transport {
            attempts: attempts.into_values().collect(),
        };
        let candidates = self.candidates(&mut attempts).await;
        let start = u64::from_le_bytes(random_bytes::<8>()) as usize % candidates.len().max(1);
        for round in 0..ROUNDS {
            if candidates.is_empty() {
                break;
            }
            if round > 0 {
                tokio::time::sleep(ROUND_PAUSE * round).await;
            }
            let now = Instant::now();
            for c in order(&candidates, start, |c| failed_recently(&c.addr, now)) {
                let url = c.base.to_string().trim_end_matches('/').to_string();
                replayed |= maybe_sent;
                let sent = self
                    .http
                    .post_to(&c.base, c.addr, path, content_type, body.clone())
                    .await;
                match sent {
                    Ok(reply) if reply.status == StatusCode::OK => {
                        mark(c.addr, false);
                        return Outcome {
                            result: Ok((url, reply.body)),
                            replayed,
                        };
                    }
                    Ok(reply) => {
                        let err = Error::Api {
                            code: error_code(&reply.body),
                            reason: serde_json::from_slice::<wire::ErrorBody>(&reply.body)
                                .ok()
                                .and_then(|e| e.reason),
                            status: reply.status,
                            url,
                        };
                        if reply.status != StatusCode::SERVICE_UNAVAILABLE || effect == Effect::Once
                        {
                            mark(c.addr, false);
                            return Outcome {
                                result: Err(err),
                                replayed,
                            };
                        }
                        mark(c.addr, true);
                        tracing::debug!("{err} ({}); trying the next Nexus", c.addr);
                        unavailable = Some(err);
                    }
                    Err(e @ transport::client::Error::Unsent { .. }) => {
                        mark(c.addr, true);
                        tracing::debug!("{e}; trying the next Nexus");
                        attempts.insert(c.place, e);
                    }
                    Err(e) => {
                        mark(c.addr, true);
                        tracing::debug!("{e}; the request may have reached it");
                        attempts.insert(c.place, e);
                        if matches!(effect, Effect::Write | Effect::Once) {
                            return Outcome {
                                result: Err(transport(attempts)),
                                replayed,
                            };
                        }
                        maybe_sent = true;
                    }
                }
            }
        }
        Outcome {
            result: Err(unavailable.unwrap_or_else(|| transport(attempts))),
            replayed,
        }
    }
}

/// Where an address stands in the URL list: (URL index, index among its addresses).
type Place = (usize, usize);

/// One address of one URL.
#[derive(Clone)]
struct Candidate {
    place: Place,
    base: Uri,
    addr: SocketAddr,
}

fn encode<Req: Serialize>(path: &str, req: &Req) -> Result<Vec<u8>> {
    serde_json::to_vec(req).map_err(|e| Error::Malformed {
        url: path.to_string(),
        reason: format!("cannot encode the request: {e}"),
    })
}

fn action(path: &str, verb: &str) -> String {
    format!("{path}?action={verb}")
}

/// The code of an error body: `{"err": code}`, else a short plain-text body, else `unknown`.
fn error_code(body: &[u8]) -> String {
    if let Ok(e) = serde_json::from_slice::<wire::ErrorBody>(body) {
        return e.err;
    }
    match std::str::from_utf8(body).map(str::trim) {
        Ok(text)
            if !text.is_empty()
                && text.len() <= 64
                && text
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ' ' | '-')) =>
        {
            text.to_string()
        }
        _ => "unknown".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_from_json_and_plain_text_bodies() {
        assert_eq!(error_code(br#"{"err":"api_not_found"}"#), "api_not_found");
        assert_eq!(error_code(b"decryption failed\n"), "decryption failed");
        assert_eq!(error_code(b""), "unknown");
        assert_eq!(error_code(b"<html>oops</html>"), "unknown");
    }

    #[test]
    fn order_rotates_then_puts_recent_failures_last() {
        let items = [1, 2, 3, 4];
        assert_eq!(order(&items, 0, |_| false), vec![1, 2, 3, 4]);
        assert_eq!(order(&items, 2, |_| false), vec![3, 4, 1, 2]);
        assert_eq!(order(&items, 2, |x| *x == 3), vec![4, 1, 2, 3]);
        // Every address failed: all are still tried, in rotation order.
        assert_eq!(order(&items, 1, |_| true), vec![2, 3, 4, 1]);
        assert!(order::<u8>(&[], 0, |_| false).is_empty());
    }

    #[test]
    fn failed_addresses_are_remembered_briefly() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        mark(addr, true);
        assert!(failed_recently(&addr, Instant::now()));
        assert!(!failed_recently(&addr, Instant::now() + BACKOFF));
        mark(addr, false);
        assert!(!failed_recently(&addr, Instant::now()));
    }

    #[test]
    fn request_ids_are_128_random_bits_in_hex() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn transport_errors_list_every_attempt() {
        let err = Error::Transport {
            attempts: vec![
                transport::client::Error::Unsent {
                    url: "https://a".into(),
                    reason: "refused".into(),
                },
                transport::client::Error::NoAnswer {
                    url: "https://b".into(),
                    reason: "reset".into(),
                },
            ],
        };
        assert_eq!(
            err.to_string(),
            "cannot reach https://a: refused; no answer from https://b: reset"
        );
    }
}
