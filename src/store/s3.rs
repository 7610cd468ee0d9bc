//! An S3-compatible object store as backing store (`SPIKE_NEXUS_BACKEND_STORE=s3`).
//!
//! # Layout
//! Each entry is one object, `<prefix><namespace>/<encoded key>`, for example
//! `spike/secrets/app/db%2Epassword`. Keys keep their `/`; `%`, `.`, and every byte outside
//! `A-Z a-z 0-9 - _ ~ /` are percent-encoded, byte by byte. Encoding byte by byte preserves
//! prefixes, so `list(ns, p)` is a `ListObjectsV2` on the encoded `p` and returns exactly the
//! keys that start with `p` (`b` finds `b`, `b/1` and `ba`; `b/` finds only `b/1`). Encoding
//! `.` keeps `.`/`..` segments away from HTTP path normalisation on any server.
//!
//! # Consistency, and what the server must give
//! The revision of an entry is its object's ETag. Writes are conditional PutObjects:
//! create-if-absent sends `If-None-Match: *`, compare-and-set sends `If-Match: <etag>`; a `412
//! Precondition Failed` (or `409 ConditionalRequestConflict`, S3's answer to two racing
//! conditional writes, or `404` for `If-Match` on a key that is gone) is [`Written::Conflict`].
//! This gives the same guarantees as the SQL stores **only if the server**
//! - evaluates `If-None-Match: *` and `If-Match` on PutObject atomically with the write (AWS S3
//!   since August/November 2024, MinIO, Cloudflare R2, Ceph RGW recent releases, ...), and
//! - has strong read-after-write consistency for GET, HEAD and LIST (AWS S3 since December 2020,
//!   MinIO).
//!
//! A server that ignores the conditional headers turns every write into last-writer-wins: two
//! Nexus instances could then lose each other's secret versions, and two instances starting on
//! an empty bucket could each create a root key. So [`S3Store::check_conditional_writes`] proves
//! the server honours them before the store is used ([`super::AnyStore::open`] runs it at every
//! start), on a probe object of its own under the prefix, outside every namespace:
//! `<prefix>conditional-write-probe/<random>`. A create with `If-None-Match: *` must succeed, a
//! second one must get 412, a write with a wrong `If-Match` must get 412 and one with the right
//! ETag must succeed; the probe object is then deleted. A server that fails any of these is
//! [`Error::Incompatible`] and Nexus exits (status 2) without writing anything else; one that
//! cannot be reached is `Unavailable` and waited for. The probe cannot see a server that checks
//! the condition and then writes as two steps (a race, not an ignored header): the conformance
//! suite's concurrent writers test that. A server with eventual consistency makes an instance
//! read stale data and see spurious conflicts.
//!
//! S3's ETag for a single-part PUT is the MD5 of the body, so two writes of identical bytes get
//! the same revision. That is harmless here: compare-and-set then compares values, and a
//! read-modify-write based on a value equal to the current one is still correct, and a copy
//! checked by its ETag holds the stored bytes. Nexus's values carry fresh AEAD nonces anyway.
//!
//! `delete` reads the object's ETag (HEAD), returns `false` if it differs, and then sends
//! `DeleteObject` with `If-Match`. Servers that honour `If-Match` on DeleteObject (AWS S3 since
//! 2024) make that atomic; on servers that ignore it, a write that lands between the HEAD and the
//! DELETE is lost. Nexus deletes only the per-name policy rows of earlier versions once they are
//! in the policy book (secrets are soft-deleted by a put; a policy is deleted by rewriting the
//! book), so the weaker guarantee only affects a row an older instance rewrites at that moment.
//!
//! [`Store::revision`] is a `HEAD`: the policy book's ETag, read on every workload request.
//!
//! # Availability
//! Reads are retried (3 attempts, short backoff); conditional writes are not, because a write
//! whose response was lost and that was sent again would fail its own condition and be reported
//! as a conflict it did not have. A failed write is `Unavailable`: it may or may not have
//! happened, and the caller's next read tells. Every call is bounded by [`REQUEST_TIMEOUT`] (connection, retries and body included), so a hung
//! or unreachable server turns into [`Error::Unavailable`] and a 503 from Nexus, never a hung
//! request. Network errors, timeouts, 5xx and throttling are `Unavailable`; so are
//! authorization failures, with S3's error code in the reason. Reasons never contain the
//! credentials.
//!
//! # Credentials and TLS
//! Static credentials only (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optional
//! `AWS_SESSION_TOKEN`); there is no instance-metadata or profile lookup. HTTPS uses rustls with
//! ring and the system's trust store; aws-lc is not in the build.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls;

use super::config::S3Config;
use super::{Entry, Error, Expect, Namespace, Result, Revision, Store, Written};

const BACKEND: &str = "s3";
/// The longest any one store call may take, retries included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to the server; a refused or unroutable endpoint fails fast and is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The S3 backend: one object per key, conditional writes on ETags.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The SDK client for reads: connection pool, signing, retries, timeouts.
    client: Client,
    /// The same without retries, for conditional writes and deletes: a write whose response was
    /// lost and that the SDK sent again would fail its own condition and look like a lost race
    /// (the root-key verifier's creator would discard its key). Without retries such a write is
    /// an honest `Unavailable`: it may or may not have happened.
    writer: Client,
    bucket: String,
    /// `SPIKE_NEXUS_S3_PREFIX`, prepended to every object key.
    prefix: String,
}

fn unavailable(reason: impl std::fmt::Display) -> Error {
    Error::Unavailable {
        backend: BACKEND,
        reason: reason.to_string(),
    }
}

/// What an SDK error means to a store call.
enum Failure {
    /// The server answered with this HTTP status (a 4xx the caller may expect).
    Status(u16),
    /// Anything else: the store did not do the work.
    Other(Error),
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    op: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Failure {
    let status = err.raw_response().map(|r| r.status().as_u16());
    match (&err, status) {
        (SdkError::ServiceError(_), Some(s)) if (400..500).contains(&s) && s != 429 => {
            Failure::Status(s)
        }
        (SdkError::ServiceError(e), s) => {
            let e = e.err();
            Failure::Other(unavailable(format!(
                "{op}: HTTP {} {} {}",
                s.map_or_else(|| "?".into(), |s| s.to_string()),
                e.code().unwrap_or("unknown error"),
                e.message().unwrap_or(""),
            )))
        }
        (SdkError::TimeoutError(_), _) => Failure::Other(unavailable(format!("{op}: timed out"))),
        _ => Failure::Other(unavailable(format!(
            "{op}: {}",
            aws_sdk_s3::error::DisplayErrorContext(&err)
        ))),
    }
}

/// Turns a status the caller did not expect into an error.
fn unexpected(op: &str, f: Failure) -> Error {
    match f {
        Failure::Status(s) => unavailable(format!("{op}: HTTP {s}")),
        Failure::Other(e) => e,
    }
}

/// Runs `fut` with the store-wide deadline: the SDK bounds each operation too, this also covers
/// reading a response body.
async fn bounded<T>(op: &str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_millis(500), fut)
        .await
        .unwrap_or_else(|_| Err(unavailable(format!("{op}: timed out"))))
}

/// Where the conditional-write probe writes, under the prefix: no namespace lists it.
const PROBE_DIR: &str = "conditional-write-probe/";

/// What the probe found besides the conditional writes every server must honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditions {
    /// `If-Match` on `DeleteObject` is honoured (AWS S3 since 2024). Without it a delete is a
    /// HEAD-compare then an unconditional delete (module docs): not refused, only reported.
    pub delete_if_match: bool,
}

/// How a server answered one write of the probe.
enum Answer {
    /// 2xx, with the new ETag.
    Written(Revision),
    /// A 412 or 409: the condition did not hold.
    Refused(u16),
}

/// Whether `b` stays as it is in an object key.
fn keep(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'/')
}

/// Percent-encodes `key` byte by byte (so `encode(a + b) == encode(a) + encode(b)`).
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_key`]; `None` for a name this store did not write.
pub fn decode_key(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl S3Store {
    /// Builds the client. Nothing is sent yet: the first call (or [`Store::ping`]) finds out
    /// whether the bucket answers, so Nexus starts and reports `store_unavailable` while the
    /// server is down.
    pub fn open(cfg: &S3Config) -> Result<S3Store> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let creds = Credentials::new(
            &cfg.credentials.access_key_id,
            &cfg.credentials.secret_access_key,
            cfg.credentials.session_token.clone(),
            None,
            "spike-environment",
        );
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(cfg.region.clone()))
            .credentials_provider(creds)
            .force_path_style(cfg.path_style)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(REQUEST_TIMEOUT)
                    .operation_timeout(REQUEST_TIMEOUT)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(1)),
            );
        if let Some(endpoint) = &cfg.endpoint {
            conf = conf.endpoint_url(endpoint.trim_end_matches('/'));
        }
        let writer = conf.clone().retry_config(RetryConfig::disabled()).build();
        Ok(S3Store {
            inner: Arc::new(Inner {
                client: Client::from_conf(conf.build()),
                writer: Client::from_conf(writer),
                bucket: cfg.bucket.clone(),
                prefix: cfg.prefix.clone(),
            }),
        })
    }

    /// Proves on a probe object (`<prefix>conditional-write-probe/<random>`) that the server
    /// honours the conditional writes this store relies on (module docs), then deletes it.
    /// [`Error::Incompatible`] when it does not, naming what it ignored; `Unavailable` when it
    /// cannot be asked. Nothing but the probe object is written.
    pub async fn check_conditional_writes(&self) -> Result<Conditions> {
        let mut suffix = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
            .map_err(|_| unavailable("conditional-write probe: no randomness"))?;
        let hex: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("{}{PROBE_DIR}{hex}", self.inner.prefix);
        let found = self.probe(&key).await;
        // Whatever the probe found, the object goes (unconditionally: it is ours alone).
        let removed = bounded("DeleteObject", async {
            self.inner
                .writer
                .delete_object()
                .bucket(&self.inner.bucket)
                .key(&key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| unexpected("DeleteObject", classify("DeleteObject", e)))
        })
        .await;
        if let Err(e) = removed {
            tracing::warn!(object = %key, error = %e, "s3: could not delete the conditional-write probe object; delete it by hand");
        }
        let conditions = found?;
        if !conditions.delete_if_match {
            tracing::warn!(
                "s3: the server ignores If-Match on DeleteObject: a policy row deleted while \
                 another instance rewrites it can lose that rewrite (src/store/s3.rs)"
            );
        }
        tracing::info!(
            delete_if_match = conditions.delete_if_match,
            "s3: the server honours conditional writes (If-None-Match: * and If-Match on PutObject)"
        );
        Ok(conditions)
    }

    async fn probe(&self, key: &str) -> Result<Conditions> {
        let refuse = |what: String| Error::Incompatible {
            backend: BACKEND,
            reason: format!(
                "the S3 server at the configured endpoint does not honour conditional writes: \
                 {what}. With it, Nexus instances would overwrite each other's updates (and \
                 could each create a root key), so Nexus will not use it; use a server that \
                 evaluates If-None-Match and If-Match on PutObject (AWS S3, SeaweedFS, MinIO, \
                 ...) or another backend"
            ),
        };
        let first = match self.probe_put(key, b"probe 1", None).await? {
            Answer::Written(r) => r,
            Answer::Refused(s) => {
                return Err(refuse(format!(
                    "a create of a new object with If-None-Match: * got HTTP {s}"
                )));
            }
        };
        if let Answer::Written(_) = self.probe_put(key, b"probe 2", None).await? {
            return Err(refuse(
                "a second create of the same object with If-None-Match: * succeeded (expected \
                 412 Precondition Failed)"
                    .into(),
            ));
        }
        // An ETag no server hands out for these bytes: MD5 is 32 hex digits.
        let wrong = Revision(format!("\"{}\"", "0".repeat(32)));
        if let Answer::Written(_) = self.probe_put(key, b"probe 3", Some(&wrong)).await? {
            return Err(refuse(
                "a write with If-Match set to a wrong ETag succeeded (expected 412 Precondition \
                 Failed)"
                    .into(),
            ));
        }
        let current = match self.probe_put(key, b"probe 4", Some(&first)).await? {
            Answer::Written(r) => r,
            Answer::Refused(s) => {
                return Err(refuse(format!(
                    "a write with If-Match set to the object's current ETag got HTTP {s}"
                )));
            }
        };
        // If-Match on DeleteObject: reported, not required (`delete` checks the ETag first).
        let out = bounded("DeleteObject", async {
            Ok(self
                .inner
                .writer
                .delete_object()
                .bucket(&self.inner.bucket)
                .key(key)
                .if_match(&wrong.0)
                .send()
                .await)
        })
        .await?;
        let delete_if_match = match out {
            Ok(_) => self.head_raw(key).await? == Some(current),
            Err(e) => match (e.raw_response().map(|r| r.status().as_u16()), &e) {
                (Some(412), SdkError::ServiceError(_)) => true,
                // Any other answer (501, 400, ...): the header is not supported.
                (Some(_), SdkError::ServiceError(_)) => false,
                _ => return Err(unexpected("DeleteObject", classify("DeleteObject", e))),
            },
        };
        Ok(Conditions { delete_if_match })
    }

    /// One write of the probe: create-if-absent (`if_match == None`) or compare-and-set.
    async fn probe_put(
        &self,
        key: &str,
        body: &[u8],
        if_match: Option<&Revision>,
    ) -> Result<Answer> {
        let op = "PutObject (conditional-write probe)";
        bounded(op, async {
            let req = self
                .inner
                .writer
                .put_object()
                .bucket(&self.inner.bucket)
                .key(key)
                .body(ByteStream::from(body.to_vec()));
            let req = match if_match {
                None => req.if_none_match("*"),
                Some(rev) => req.if_match(&rev.0),
            };
            match req.send().await {
                Ok(out) => Ok(Answer::Written(etag(op, out.e_tag())?)),
                Err(e) => {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    let service = matches!(e, SdkError::ServiceError(_));
                    match (status, service) {
                        (Some(s @ (412 | 409)), true) => Ok(Answer::Refused(s)),
                        // A server that rejects the headers themselves cannot be waited out:
                        // 501 NotImplemented, or 400 InvalidArgument/NotImplemented (other 400s,
                        // such as a wrong signing region, are not about the headers).
                        (Some(s @ (400 | 501)), true)
                            if s == 501
                                || matches!(
                                    e.as_service_error().and_then(|se| se.code()),
                                    Some("InvalidArgument" | "NotImplemented")
                                ) =>
                        {
                            let detail = e.as_service_error().map_or_else(String::new, |se| {
                                format!(
                                    "{} {}",
                                    se.code().unwrap_or(""),
                                    se.message().unwrap_or("")
                                )
                            });
                            Err(Error::Incompatible {
                                backend: BACKEND,
                                reason: format!(
                                    "the S3 server at the configured endpoint rejects conditional \
                                     PutObject (HTTP {s} {}); Nexus needs If-None-Match and \
                                     If-Match on PutObject",
                                    detail.trim()
                                ),
                            })
                        }
                        _ => Err(unexpected(op, classify(op, e))),
                    }
                }
            }
        })
        .await
    }

    /// The ETag of the object named `name` (the whole name), `None` if it does not exist.
    async fn head_raw(&self, name: &str) -> Result<Option<Revision>> {
        let out = self
            .inner
            .client
            .head_object()
            .bucket(&self.inner.bucket)
            .key(name)
            .send()
            .await;
        match out {
            Ok(o) => Ok(Some(etag("HeadObject", o.e_tag())?)),
            Err(e) => match classify("HeadObject", e) {
                Failure::Status(404) => Ok(None),
                f => Err(unexpected("HeadObject", f)),
            },
        }
    }

    /// The object name for `key` in `ns`.
    fn object(&self, ns: Namespace, key: &str) -> String {
        format!("{}{}/{}", self.inner.prefix, ns.as_str(), encode_key(key))
    }

    /// The object-name prefix of namespace `ns`.
    fn ns_prefix(&self, ns: Namespace) -> String {
        format!("{}{}/", self.inner.prefix, ns.as_str())
    }

    /// The current ETag of `key`, `None` if it does not exist.
    async fn head(&self, ns: Namespace, key: &str) -> Result<Option<Revision>> {
        self.head_raw(&self.object(ns, key)).await
    }

    async fn get_inner(&self, ns: Namespace, key: &str) -> Result<Option<Entry>> {
        let out = self
            .inner
            .client
            .get_object()
            .bucket(&self.inner.bucket)
            .key(self.object(ns, key))
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                return match classify("GetObject", e) {
                    Failure::Status(404) => Ok(None),
                    f => Err(unexpected("GetObject", f)),
                };
            }
        };
        let revision = etag("GetObject", out.e_tag())?;
        let value = out
            .body
            .collect()
            .await
            .map_err(|e| unavailable(format!("GetObject: reading the body: {e}")))?
            .into_bytes()
            .to_vec();
        Ok(Some(Entry { value, revision }))
    }

    async fn list_inner(&self, ns: Namespace, prefix: &str) -> Result<Vec<String>> {
        let base = self.ns_prefix(ns);
        let full = format!("{base}{}", encode_key(prefix));
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .inner
                .client
                .list_objects_v2()
                .bucket(&self.inner.bucket)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| unexpected("ListObjectsV2", classify("ListObjectsV2", e)))?;
            for obj in out.contents() {
                let Some(name) = obj.key() else { continue };
                match name.strip_prefix(&base).and_then(decode_key) {
                    // The server filtered by prefix already; check again, cheaply.
                    Some(k) if k.starts_with(prefix) => keys.push(k),
                    Some(_) => {}
                    None => {
                        tracing::warn!(object = name, "s3: ignoring an object spike did not write")
                    }
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }
}

/// The ETag of a response; every S3 server sends one for objects.
fn etag(op: &str, tag: Option<&str>) -> Result<Revision> {
    tag.map(|t| Revision(t.to_string())).ok_or(Error::Corrupt {
        backend: BACKEND,
        reason: format!("{op}: the server sent no ETag"),
    })
}

impl Store for S3Store {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn ping(&self) -> Result<()> {
        bounded("HeadBucket", async {
            self.inner
                .client
                .head_bucket()
                .bucket(&self.inner.bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| unexpected("HeadBucket", classify("HeadBucket", e)))
        })
        .await
    }

    async fn get(&self, ns: Namespace, key: &str) -> Result<Option<Entry>> {
        bounded("GetObject", self.get_inner(ns, key)).await
    }

    async fn revision(&self, ns: Namespace, key: &str) -> Result<Option<Revision>> {
        bounded("HeadObject", self.head(ns, key)).await
    }

    async fn put(
        &self,
        ns: Namespace,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<Written> {
        bounded("PutObject", async {
            let req = self
                .inner
                .writer
                .put_object()
                .bucket(&self.inner.bucket)
                .key(self.object(ns, key))
                .body(ByteStream::from(value));
            let req = match &expect {
                Expect::Absent => req.if_none_match("*"),
                Expect::Revision(rev) => req.if_match(&rev.0),
            };
            match req.send().await {
                Ok(out) => Ok(Written::Done(etag("PutObject", out.e_tag())?)),
                Err(e) => match classify("PutObject", e) {
                    // 412: the condition failed. 409: a concurrent conditional write won.
                    // 404: If-Match on a key that no longer exists.
                    Failure::Status(412 | 409) => Ok(Written::Conflict),
                    Failure::Status(404) if matches!(expect, Expect::Revision(_)) => {
                        Ok(Written::Conflict)
                    }
                    f => Err(unexpected("PutObject", f)),
                },
            }
        })
        .await
    }

    async fn delete(&self, ns: Namespace, key: &str, revision: &Revision) -> Result<bool> {
        bounded("DeleteObject", async {
            // Checked here too, for servers that ignore If-Match on DeleteObject (module docs).
            if self.head(ns, key).await?.as_ref() != Some(revision) {
                return Ok(false);
            }
            let out = self
                .inner
                .writer
                .delete_object()
                .bucket(&self.inner.bucket)
                .key(self.object(ns, key))
                .if_match(&revision.0)
                .send()
                .await;
            match out {
                Ok(_) => Ok(true),
                Err(e) => match classify("DeleteObject", e) {
                    Failure::Status(412 | 409 | 404) => Ok(false),
                    f => Err(unexpected("DeleteObject", f)),
                },
            }
        })
        .await
    }

    async fn list(&self, ns: Namespace, prefix: &str) -> Result<Vec<String>> {
        // Each page is bounded by the SDK's timeout; a listing has no overall deadline beyond
        // that because its length depends on the number of keys.
        self.list_inner(ns, prefix).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_keep_prefixes() {
        for k in ["a/b", "c%", "c_x", "a/./b", "é/ü", "sp ace", "x.y", ""] {
            assert_eq!(decode_key(&encode_key(k)).as_deref(), Some(k));
        }
        assert_eq!(encode_key("app/db.password"), "app/db%2Epassword");
        assert_eq!(encode_key("c%"), "c%25");
        let (a, b) = ("b/", "b/1");
        assert!(encode_key(b).starts_with(&encode_key(a)));
        assert!(!encode_key("ba").starts_with(&encode_key("b/")));
        assert_eq!(decode_key("bad%zz"), None);
        assert_eq!(decode_key("bad%2"), None);
    }
}
