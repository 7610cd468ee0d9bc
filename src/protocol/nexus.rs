//! Nexus's wire protocol: SPIKE's routes and JSON shapes, shared by the server ([`crate::nexus`])
//! and the client ([`crate::client`]), so the two cannot drift apart.
//!
//! Every route is `POST` with a JSON body; the operation is the exact path plus `?action=`.
//! Errors are `{"err": "<code>"}` with the status of [`ErrorCode::status`].
//!
//! | path | `?action=` | request | 200 response | permission (path checked) |
//! |---|---|---|---|---|
//! | `/v1/store/secrets` | — | [`SecretPutRequest`] `{"path","values":{k:v},"cas"?,"request_id"?}` | [`SecretPutResponse`] `{"version"}` | `write` (path) |
//! | `/v1/store/secrets` | `get` | [`SecretGetRequest`] `{"path","version"?}` | [`SecretGetResponse`] `{"data":{k:v},"version"}` | `read` (path) |
//! | `/v1/store/secrets` | `delete` | [`SecretVersionsRequest`] `{"path","versions":[n]}` | `{}` | `write` (path) |
//! | `/v1/store/secrets` | `undelete` | [`SecretVersionsRequest`] | `{}` | `write` (path) |
//! | `/v1/store/secrets` | `list` | [`SecretListRequest`] `{"prefix"?}` | [`SecretListResponse`] `{"keys":[..]}` | `list` (`spike/system/secret`, or each path) |
//! | `/v1/store/secrets/metadata` | `get` | [`SecretGetRequest`] | [`SecretMetadataResponse`] | `read` (path) |
//! | `/v1/acl/policy` | — | [`PolicyPutRequest`] `{"name","spiffeidPattern","pathPattern","permissions"}` | `{}` | `write` (`spike/system/acl`) |
//! | `/v1/acl/policy` | `get` | [`PolicyIdRequest`] `{"id": name}` | [`Policy`] (note `spiffiedPattern`) | `read` (`spike/system/acl`) |
//! | `/v1/acl/policy` | `delete` | [`PolicyIdRequest`] | `{}` | `write` (`spike/system/acl`) |
//! | `/v1/acl/policy` | `list` | [`PolicyListRequest`] `{"spiffeidPattern"?,"pathPattern"?}` | [`PolicyListResponse`] `{"policies":[..]}` | `list` (`spike/system/acl`) |
//! | `/v1/cipher/encrypt` | — | [`EncryptRequest`] or raw bytes (`application/octet-stream`) | [`EncryptResponse`] or `0x01‖nonce‖ct` | `execute` (`spike/system/cipher/exec`) |
//! | `/v1/cipher/decrypt` | — | [`DecryptRequest`] or `0x01‖nonce‖ct` | [`DecryptResponse`] or raw bytes | `execute` (`spike/system/cipher/exec`) |
//! | `/v1/operator/recover` | — | `{}` | [`RecoverResponse`] `{"shards":{"1":[32 ints],..}}` | recover-role operators only |
//! | `/v1/operator/restore` | — | [`RestoreRequest`] `{"id","shard":[32 ints]}` | [`RestoreResponse`] `{"collected","remaining","restored"}` | restore-role operators only; works without a key |
//!
//! Our additions keep SPIKE's shapes intact: `cas` on put (409 on mismatch), `request_id` on
//! put (a replayed put returns the version the first one made instead of writing again),
//! `version` in put and get answers, `prefix` on list, 413 for bodies over the limit, and list
//! answers filtered to what the caller may list. Superuser operators bypass policies.

use std::collections::BTreeMap;

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

/// Secrets: put (no action), get, delete, undelete, list.
pub const SECRETS_PATH: &str = "/v1/store/secrets";
/// A secret's metadata (`?action=get`).
pub const SECRET_METADATA_PATH: &str = "/v1/store/secrets/metadata";
/// Policies: put (no action), get, delete, list.
pub const POLICY_PATH: &str = "/v1/acl/policy";
/// Encrypt with the cipher key (JSON or a byte stream).
pub const ENCRYPT_PATH: &str = "/v1/cipher/encrypt";
/// Decrypt what [`ENCRYPT_PATH`] produced.
pub const DECRYPT_PATH: &str = "/v1/cipher/decrypt";
/// Recovery shards for the recover operator.
pub const RECOVER_PATH: &str = "/v1/operator/recover";
/// One recovery shard from the restore operator.
pub const RESTORE_PATH: &str = "/v1/operator/restore";
/// Add a data key to the keyring (ours; superuser only): new values are sealed under it.
pub const ROTATE_PATH: &str = "/v1/operator/rotate";
/// Start a re-encryption pass (ours; superuser only): records under older data keys are
/// rewritten under the current one, in the background.
pub const REENCRYPT_PATH: &str = "/v1/operator/reencrypt";
/// Mark a data key retired once no record uses it (ours; superuser only).
pub const RETIRE_PATH: &str = "/v1/operator/retire";
/// A new root key, re-wrapped keyring and new Keeper shards (ours; superuser only).
pub const REKEY_PATH: &str = "/v1/operator/rekey";
/// Readiness for load balancers (`GET`/`HEAD`, no client certificate).
pub const HEALTH_PATH: &str = "/health";

/// The version byte that starts every cipher stream Nexus writes (and the JSON `version`): the
/// ciphertext names the data key that sealed it (`src/nexus/cipher.rs`).
pub const CIPHER_VERSION: u8 = 2;
/// The cipher version of releases before the keyring: sealed under the legacy key, still
/// opened.
pub const CIPHER_VERSION_LEGACY: u8 = 1;

/// Stable error codes: SPIKE's, plus ours for what SPIKE does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: malformed request, unknown route or action, invalid input.
    ApiBadRequest,
    /// 401: the caller's identity may not do this.
    AccessUnauthorized,
    /// 404: no such secret, version or policy.
    ApiNotFound,
    /// 409: `cas` did not match the current version (ours).
    ApiConflict,
    /// 413: the body is over the limit (ours).
    ApiRequestTooLarge,
    /// 500: anything else; details are in the server log only.
    ApiInternalError,
    /// 503: the root key is not loaded yet.
    StateNotReady,
    /// 503: the backing store is not answering (ours).
    StoreUnavailable,
    /// 503: the audit trail cannot be written, and Nexus is fail-closed (ours).
    AuditUnavailable,
}

impl ErrorCode {
    /// The HTTP status that goes with the code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::ApiBadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::AccessUnauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::ApiNotFound => StatusCode::NOT_FOUND,
            ErrorCode::ApiConflict => StatusCode::CONFLICT,
            ErrorCode::ApiRequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::ApiInternalError => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::StateNotReady
            | ErrorCode::StoreUnavailable
            | ErrorCode::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Every code, for lookups by text.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::ApiBadRequest,
        ErrorCode::AccessUnauthorized,
        ErrorCode::ApiNotFound,
        ErrorCode::ApiConflict,
        ErrorCode::ApiRequestTooLarge,
        ErrorCode::ApiInternalError,
        ErrorCode::StateNotReady,
        ErrorCode::StoreUnavailable,
        ErrorCode::AuditUnavailable,
    ];

    /// The code an `err` text names, if it is one of ours (a SPIKE Nexus may send others).
    pub fn parse(text: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == text)
    }

    /// The wire text of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ApiBadRequest => "api_bad_request",
            ErrorCode::AccessUnauthorized => "access_unauthorized",
            ErrorCode::ApiNotFound => "api_not_found",
            ErrorCode::ApiConflict => "api_conflict",
            ErrorCode::ApiRequestTooLarge => "api_request_too_large",
            ErrorCode::ApiInternalError => "api_internal_error",
            ErrorCode::StateNotReady => "state_not_ready",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::AuditUnavailable => "audit_unavailable",
        }
    }
}

/// `{"err": "<code>"}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The [`ErrorCode`]'s text (or another code from a SPIKE Nexus).
    pub err: String,
    /// Why, for the operator routes of ours that say (superuser callers only; never anything
    /// secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// `{}`: the answer (or request) with nothing in it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Empty {}

/// `POST /v1/store/secrets`: write a new version.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretPutRequest {
    /// The secret's path.
    pub path: String,
    /// The key/value pairs of the new version.
    #[serde(default)]
    pub values: BTreeMap<String, String>,
    /// Check-and-set: the version that must be current (0: the path must hold no live version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cas: Option<u64>,
    /// Idempotency key of one logical write (the client sends 128 random bits as hex): a put
    /// whose id is among the last ones applied to the path returns the version that one made
    /// and writes nothing, so a client may resend a put whose answer it never got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The answer to a put.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretPutResponse {
    /// The version written (ours); `0` from a SPIKE Nexus, which answers `{}`.
    #[serde(default)]
    pub version: u64,
}

/// `?action=get` on secrets or their metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretGetRequest {
    /// The secret's path.
    pub path: String,
    /// 0 or absent: the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// The answer to a get.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretGetResponse {
    /// The version's key/value pairs.
    pub data: BTreeMap<String, String>,
    /// The version served (ours; absent from a SPIKE Nexus).
    #[serde(default)]
    pub version: u64,
}

/// `?action=delete` or `?action=undelete`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretVersionsRequest {
    /// The secret's path.
    pub path: String,
    /// Empty: the current version. `0` also means the current version.
    #[serde(default)]
    pub versions: Vec<u64>,
}

/// `?action=list`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SecretListRequest {
    /// Only paths starting with this (ours; SPIKE lists everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// The answer to a list.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretListResponse {
    /// The paths the caller may list, sorted.
    pub keys: Vec<String>,
}

/// One version in a metadata answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// When the version was written (RFC 3339).
    #[serde(default)]
    pub created_time: String,
    /// The version number.
    #[serde(default)]
    pub version: u64,
    /// When it was soft-deleted, if it was.
    #[serde(default)]
    pub deleted_time: Option<String>,
}

/// A secret's own metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretMetadata {
    /// The version a read without a version gets; `0` when every version is deleted.
    #[serde(default)]
    pub current_version: u64,
    /// The lowest version not deleted.
    #[serde(default)]
    pub oldest_version: u64,
    /// When the path was first written (RFC 3339).
    #[serde(default)]
    pub created_time: String,
    /// When the path was last written (RFC 3339).
    #[serde(default)]
    pub updated_time: String,
    /// Versions kept.
    #[serde(default)]
    pub max_versions: u32,
}

/// The answer to a metadata get.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SecretMetadataResponse {
    /// Keyed by the decimal version number, as Go encodes `map[int]T`.
    #[serde(default)]
    pub versions: BTreeMap<String, VersionInfo>,
    /// The path's own metadata.
    #[serde(default)]
    pub metadata: SecretMetadata,
}

/// `POST /v1/acl/policy`: create or replace a policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyPutRequest {
    /// The policy's name, its identifier.
    pub name: String,
    /// SPIKE's request key is `spiffeidPattern`; older SDKs sent `spiffedPattern`.
    #[serde(alias = "spiffedPattern", alias = "spiffiedPattern")]
    pub spiffeid_pattern: String,
    /// Which secret paths it covers (a regular expression).
    pub path_pattern: String,
    /// What it grants: `read`, `write`, `list`, `execute`, `super`.
    pub permissions: Vec<String>,
}

/// `?action=get` or `?action=delete` on a policy: `id` is the policy's name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyIdRequest {
    /// The policy's name (SPIKE kept the field name `id`).
    pub id: String,
}

/// `?action=list` on policies: exact-string filters, the SPIFFE-ID one first; empty or absent
/// means no filter.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyListRequest {
    /// Only policies with exactly this SPIFFE-ID pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffeid_pattern: Option<String>,
    /// Only policies with exactly this path pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_pattern: Option<String>,
}

/// A policy as SPIKE returns it: note the `spiffiedPattern` key. `id` is the name (SPIKE's is
/// always empty).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// The policy's name again (SPIKE's is empty).
    #[serde(default)]
    pub id: String,
    /// The policy's name.
    pub name: String,
    /// The SPIFFE-ID pattern (SPIKE's key is misspelt `spiffiedPattern`; both are read). A
    /// SPIKE Nexus's list answers carry only `id` and `name`, so every field but `name` may be
    /// absent.
    #[serde(rename = "spiffiedPattern", alias = "spiffeidPattern", default)]
    pub spiffeid_pattern: String,
    /// The path pattern.
    #[serde(default)]
    pub path_pattern: String,
    /// The permissions granted.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// When it was created (RFC 3339).
    #[serde(default)]
    pub created_at: String,
    /// When it was last replaced (RFC 3339).
    #[serde(default)]
    pub updated_at: String,
}

/// The answer to a policy list.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyListResponse {
    /// The policies, by name.
    pub policies: Vec<Policy>,
}

/// Base64 (standard, padded) byte strings, as Go encodes `[]byte`.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes bytes as standard base64.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    /// Reads standard base64.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// JSON-mode encryption request.
#[derive(Clone, Serialize, Deserialize)]
pub struct EncryptRequest {
    /// The bytes to encrypt (base64).
    #[serde(with = "b64")]
    pub plaintext: Vec<u8>,
    /// SPIKE's algorithm field; only the default is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

/// JSON-mode encryption answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncryptResponse {
    /// The ciphertext format version ([`CIPHER_VERSION`]).
    pub version: u8,
    /// The AES-GCM nonce (base64).
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    /// Ciphertext and tag (base64).
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
}

/// JSON-mode decryption request: an [`EncryptResponse`]'s fields.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecryptRequest {
    /// The ciphertext format version.
    pub version: u8,
    /// The AES-GCM nonce (base64).
    #[serde(with = "b64")]
    pub nonce: Vec<u8>,
    /// Ciphertext and tag (base64).
    #[serde(with = "b64")]
    pub ciphertext: Vec<u8>,
    /// SPIKE's algorithm field; only the default is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

/// JSON-mode decryption answer.
#[derive(Clone, Serialize, Deserialize)]
pub struct DecryptResponse {
    /// The decrypted bytes (base64).
    #[serde(with = "b64")]
    pub plaintext: Vec<u8>,
}

/// [`ROTATE_PATH`] request.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RotateRequest {
    /// Also start a re-encryption pass once the key is added.
    #[serde(default)]
    pub reencrypt: bool,
}

/// [`RETIRE_PATH`] request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetireRequest {
    /// The data key to retire.
    pub id: u32,
}

/// One data key of the keyring, as [`ROTATE_PATH`] lists it (nothing secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKeyInfo {
    /// The id sealed values carry (0: the legacy key, derived from the root key).
    pub id: u32,
    /// `active` or `retired`.
    pub state: String,
    /// When it was added, Unix seconds (0 for the legacy key).
    pub created: u64,
}

/// [`ROTATE_PATH`] answer: the new current data key and the whole keyring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateResponse {
    /// The id new values are sealed under from now on, on every instance.
    #[serde(rename = "currentKey")]
    pub current_key: u32,
    /// Every data key, by id.
    pub keys: Vec<DataKeyInfo>,
}

/// [`REKEY_PATH`] request: the new sharing; what is left out stays as it is.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RekeyRequest {
    /// Shards that rebuild the new key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    /// The Keepers of the new key, in Shamir index order (HTTPS URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepers: Option<Vec<String>>,
}

/// [`REKEY_PATH`] answer (nothing secret: key ids are one-way fingerprints).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RekeyResponse {
    /// The key replaced.
    #[serde(rename = "previousKeyId")]
    pub previous_key_id: String,
    /// The new root key's id.
    #[serde(rename = "keyId")]
    pub key_id: String,
    /// Its threshold.
    pub threshold: u8,
    /// Its Keepers, in index order.
    pub keepers: Vec<String>,
    /// Keepers that did not confirm their new shard (they are refilled later).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed: Vec<String>,
}

/// The rule every Shamir sharing obeys, wherever it is given (configuration, `spike operator
/// rekey`, the server): between 1 and 255 Keepers, one shard each, and a threshold between 1
/// and the number of Keepers.
pub fn check_sharing(threshold: u8, keepers: usize) -> Result<(), String> {
    if keepers == 0 || keepers > 255 {
        return Err(format!(
            "needs between 1 and 255 Keepers (one shard each), got {keepers}"
        ));
    }
    if threshold == 0 || usize::from(threshold) > keepers {
        return Err(format!(
            "the threshold must be between 1 and the number of Keepers ({keepers}), got {threshold}"
        ));
    }
    Ok(())
}

/// `/v1/operator/recover` answer: index (decimal string) → 32-byte shard, as SPIKE encodes
/// `map[int]*[32]byte`. Zeroized on drop.
#[derive(Serialize, Deserialize)]
pub struct RecoverResponse {
    /// Recovery shards by Shamir index (decimal), each 32 bytes as a JSON array of numbers.
    pub shards: BTreeMap<String, [u8; 32]>,
}

impl Drop for RecoverResponse {
    fn drop(&mut self) {
        for v in self.shards.values_mut() {
            zeroize::Zeroize::zeroize(v);
        }
    }
}

/// `/v1/operator/restore` request: one shard and its index. Zeroized on drop.
#[derive(Serialize, Deserialize)]
pub struct RestoreRequest {
    /// The shard's Shamir index.
    pub id: u64,
    /// The shard: 32 bytes as a JSON array of numbers.
    pub shard: Option<[u8; 32]>,
}

impl Drop for RestoreRequest {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.shard);
    }
}

/// The answer to one restore shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreResponse {
    /// Distinct shards held so far.
    pub collected: usize,
    /// Shards still needed.
    pub remaining: usize,
    /// Whether the root key is restored.
    pub restored: bool,
}

/// RFC 3339 in UTC with nanoseconds, as Go encodes `time.Time`.
pub fn rfc3339(unix_nanos: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_nanos))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    let nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_uses_spikes_response_key_and_accepts_both_request_keys() {
        let p = Policy {
            id: String::new(),
            name: "web".into(),
            spiffeid_pattern: "^spiffe://spike.ist/web$".into(),
            path_pattern: "^secrets/web/.*$".into(),
            permissions: vec!["read".into()],
            created_at: rfc3339(0),
            updated_at: rfc3339(1_500_000_000),
        };
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["spiffiedPattern"], "^spiffe://spike.ist/web$");
        assert_eq!(json["id"], "");
        assert_eq!(json["createdAt"], "1970-01-01T00:00:00Z");
        assert_eq!(json["updatedAt"], "1970-01-01T00:00:01.5Z");
        for key in ["spiffeidPattern", "spiffedPattern"] {
            let req: PolicyPutRequest = serde_json::from_str(&format!(
                r#"{{"name":"n","{key}":"x","pathPattern":"p","permissions":["read"]}}"#
            ))
            .unwrap();
            assert_eq!(req.spiffeid_pattern, "x");
        }
    }

    #[test]
    fn shapes_match_spike() {
        let meta = SecretMetadataResponse {
            versions: [(
                "1".to_string(),
                VersionInfo {
                    created_time: rfc3339(0),
                    version: 1,
                    deleted_time: None,
                },
            )]
            .into(),
            metadata: SecretMetadata {
                current_version: 1,
                oldest_version: 1,
                created_time: rfc3339(0),
                updated_time: rfc3339(0),
                max_versions: 10,
            },
        };
        let json = serde_json::to_value(&meta).unwrap();
        assert_eq!(
            json["versions"]["1"]["deletedTime"],
            serde_json::Value::Null
        );
        assert_eq!(json["versions"]["1"]["createdTime"], "1970-01-01T00:00:00Z");
        assert_eq!(json["metadata"]["currentVersion"], 1);
        assert_eq!(json["metadata"]["maxVersions"], 10);
        let enc = EncryptResponse {
            version: 1,
            nonce: vec![0; 12],
            ciphertext: vec![1, 2, 3],
        };
        assert_eq!(
            serde_json::to_string(&enc).unwrap(),
            r#"{"version":1,"nonce":"AAAAAAAAAAAAAAAA","ciphertext":"AQID"}"#
        );
        let get: SecretGetRequest = serde_json::from_str(r#"{"path":"a/b"}"#).unwrap();
        assert_eq!(get.version, None);
        assert_eq!(ErrorCode::ApiBadRequest.as_str(), "api_bad_request");
        assert_eq!(
            serde_json::to_string(&ErrorCode::StateNotReady).unwrap(),
            r#""state_not_ready""#
        );
    }

    /// Answers as a SPIKE Nexus gives them (SPIKE main, reference §5): less than ours, with
    /// SPIKE's `err` fields and Go's encodings. Our client decodes every one.
    #[test]
    fn spike_nexus_answers_decode() {
        let put: SecretPutResponse = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(put.version, 0);
        let put: SecretPutResponse = serde_json::from_str(r#"{"err":""}"#).unwrap();
        assert_eq!(put.version, 0);
        let get: SecretGetResponse =
            serde_json::from_str(r#"{"data":{"k":"v"},"err":""}"#).unwrap();
        assert_eq!(get.data["k"], "v");
        let meta: SecretMetadataResponse = serde_json::from_str(
            r#"{"versions":{"0":{"createdTime":"2026-11-29T10:00:00.123456789Z","version":1,"deletedTime":null}},
                "metadata":{"currentVersion":1,"oldestVersion":1,"createdTime":"2026-11-29T10:00:00Z",
                "updatedTime":"2026-11-29T10:00:00Z","maxVersions":10},"err":""}"#,
        )
        .unwrap();
        assert_eq!(meta.metadata.current_version, 1);
        let meta: SecretMetadataResponse = serde_json::from_str(r#"{}"#).unwrap();
        assert!(meta.versions.is_empty());
        let list: PolicyListResponse = serde_json::from_str(
            r#"{"policies":[{"id":"","name":"web","spiffiedPattern":"^spiffe://a/b$","pathPattern":"^s/.*$","permissions":["read"],"createdAt":"2026-11-29T10:00:00Z","updatedAt":"2026-11-29T10:00:00Z"}],"err":""}"#,
        )
        .unwrap();
        assert_eq!(list.policies[0].name, "web");
        let list: PolicyListResponse =
            serde_json::from_str(r#"{"policies":[{"id":"","name":"web"}],"err":""}"#).unwrap();
        assert_eq!(list.policies[0].name, "web");
        let restore: RestoreResponse =
            serde_json::from_str(r#"{"collected":1,"remaining":1,"restored":false,"err":""}"#)
                .unwrap();
        assert!(!restore.restored);
        let _: Empty = serde_json::from_str(r#"{"err":""}"#).unwrap();
    }
}
