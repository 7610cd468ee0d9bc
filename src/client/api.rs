//! A typed client for Nexus's API ([`crate::api`]), as the CLI commands use it.
//!
//! [`NexusClient::from_env`] builds it from the client environment: `SPIKE_NEXUS_API_URL` (one
//! URL or a comma-separated list), `SPIKE_TRUST_ROOT` and the caller's SVID files
//! (`SPIKE_SVID_DIR` or the single-file overrides). The server must prove the Nexus SPIFFE ID.
//!
//! Failover over the URL list, in order:
//! - [`client::Error::Unsent`] (nothing reached the server) or a `503` answer (this instance
//!   has no root key yet, or its store is down): try the next URL, for every request.
//! - [`client::Error::NoAnswer`] (the request may have reached a server): try the next URL only
//!   for requests without effect on the stored state (reads, lists, the cipher); a write stops
//!   there, because replaying it elsewhere could apply it twice.
//! - Any other answer is final.
//!
//! When every URL fails, the error is the last `503` answer if there was one (it says more than a
//! refused connection), else every transport failure, in the order tried.

use std::collections::BTreeMap;

use bytes::Bytes;
use hyper::{StatusCode, Uri};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    self, DECRYPT_PATH, DecryptRequest, DecryptResponse, ENCRYPT_PATH, EncryptRequest,
    EncryptResponse, POLICY_PATH, Policy, PolicyIdRequest, PolicyListRequest, PolicyListResponse,
    PolicyPutRequest, SECRET_METADATA_PATH, SECRETS_PATH, SecretGetRequest, SecretGetResponse,
    SecretListRequest, SecretListResponse, SecretMetadataResponse, SecretPutRequest,
    SecretPutResponse, SecretVersionsRequest,
};
use crate::client::{self, HttpsClient, Timeouts};
use crate::config::{self, Source};
use crate::identity::{self, ExpectedPeer, Role, SpiffeId, SvidSource};

/// Why a call to Nexus failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The client environment is incomplete or invalid (URLs, trust domain, SVID paths).
    #[error("{0}")]
    Config(#[from] config::Error),
    /// The caller's SVID could not be loaded, or no TLS configuration could be built from it.
    #[error("{0}")]
    Identity(#[from] identity::Error),
    /// No URL gave an answer. Holds every attempt, in order; never empty.
    #[error("{}", join_attempts(.attempts))]
    Transport { attempts: Vec<client::Error> },
    /// Nexus answered with an error: `code` is the `err` of its `{"err": code}` body (or the
    /// text of a plain-text body, as SPIKE's cipher stream mode sends).
    #[error("Nexus at {url} answered {status} ({code})")]
    Api {
        url: String,
        status: StatusCode,
        code: String,
    },
    /// Nexus answered 200 with a body that is not the expected shape.
    #[error("unexpected answer from Nexus at {url}: {reason}")]
    Malformed { url: String, reason: String },
}

impl Error {
    /// The `err` code of an API error, if this is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn join_attempts(attempts: &[client::Error]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

pub type Result<T> = std::result::Result<T, Error>;

/// Whether a request may be replayed on another Nexus after it may have reached one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// Reads and the cipher: no stored state changes, so a replay is harmless.
    None,
    /// Changes stored state: replayed only when it cannot have been sent.
    Write,
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
    /// Builds a client from the client environment (see the module docs).
    pub fn from_env(env: &impl Source) -> Result<NexusClient> {
        let urls = config::api_urls(env)?;
        let ident = config::Identity::from_source(env)?;
        let source = SvidSource::load(ident.svid)?;
        let tls = identity::client_config(
            Some(&source),
            None,
            &ident.trust_domain,
            ExpectedPeer::Role(Role::Nexus),
        )?;
        let caller = source.current().id().clone();
        Ok(NexusClient::new(
            HttpsClient::new(tls, Timeouts::default()),
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
    /// current (0: the path must hold no live version), else 409 `api_conflict`.
    pub async fn secret_put(
        &self,
        path: &str,
        values: BTreeMap<String, String>,
        cas: Option<u64>,
    ) -> Result<u64> {
        let req = SecretPutRequest {
            path: path.to_string(),
            values,
            cas,
        };
        let resp: SecretPutResponse = self.json(SECRETS_PATH, &req, Effect::Write).await?;
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
    pub async fn secret_undelete(&self, path: &str, versions: Vec<u64>) -> Result<()> {
        self.versions_call("undelete", path, versions).await
    }

    async fn versions_call(&self, verb: &str, path: &str, versions: Vec<u64>) -> Result<()> {
        let req = SecretVersionsRequest {
            path: path.to_string(),
            versions,
        };
        let _: api::Empty = self
            .json(&action(SECRETS_PATH, verb), &req, Effect::Write)
            .await?;
        Ok(())
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
        let _: api::Empty = self.json(POLICY_PATH, policy, Effect::Write).await?;
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

    /// Deletes the policy called `name`.
    pub async fn policy_delete(&self, name: &str) -> Result<()> {
        let req = PolicyIdRequest {
            id: name.to_string(),
        };
        let _: api::Empty = self
            .json(&action(POLICY_PATH, "delete"), &req, Effect::Write)
            .await?;
        Ok(())
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
    pub async fn recover(&self) -> Result<api::RecoverResponse> {
        self.json(api::RECOVER_PATH, &api::Empty {}, Effect::None)
            .await
    }

    /// Sends one recovery shard towards a restore. Restore state lives in one instance's
    /// memory, so build this client with that instance's URL only.
    pub async fn restore(&self, req: &api::RestoreRequest) -> Result<api::RestoreResponse> {
        self.json(api::RESTORE_PATH, req, Effect::Write).await
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
        let body = serde_json::to_vec(req).map_err(|e| Error::Malformed {
            url: path.to_string(),
            reason: format!("cannot encode the request: {e}"),
        })?;
        let (url, reply) = self.send(path, JSON, body, effect).await?;
        serde_json::from_slice(&reply).map_err(|e| Error::Malformed {
            url,
            reason: format!("the body is not the expected JSON ({e})"),
        })
    }

    /// Sends one request, failing over along the URL list; returns the answering URL and the
    /// body of its 200 answer.
    async fn send(
        &self,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
        effect: Effect,
    ) -> Result<(String, Bytes)> {
        let mut attempts = Vec::new();
        let mut unavailable = None;
        for base in &self.urls {
            let url = base.to_string().trim_end_matches('/').to_string();
            match self.http.post(base, path, content_type, body.clone()).await {
                Ok(reply) if reply.status == StatusCode::OK => return Ok((url, reply.body)),
                Ok(reply) => {
                    let err = Error::Api {
                        code: error_code(&reply.body),
                        status: reply.status,
                        url,
                    };
                    if reply.status != StatusCode::SERVICE_UNAVAILABLE {
                        return Err(err);
                    }
                    tracing::debug!("{err}; trying the next Nexus");
                    unavailable = Some(err);
                }
                Err(e @ client::Error::Unsent { .. }) => {
                    tracing::debug!("{e}; trying the next Nexus");
                    attempts.push(e);
                }
                Err(e) => {
                    let last = effect == Effect::Write;
                    attempts.push(e);
                    if last {
                        break;
                    }
                }
            }
        }
        Err(unavailable.unwrap_or(Error::Transport { attempts }))
    }
}

fn action(path: &str, verb: &str) -> String {
    format!("{path}?action={verb}")
}

/// The code of an error body: `{"err": code}`, else a short plain-text body, else `unknown`.
fn error_code(body: &[u8]) -> String {
    if let Ok(e) = serde_json::from_slice::<api::ErrorBody>(body) {
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
    fn transport_errors_list_every_attempt() {
        let err = Error::Transport {
            attempts: vec![
                client::Error::Unsent {
                    url: "https://a".into(),
                    reason: "refused".into(),
                },
                client::Error::NoAnswer {
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
