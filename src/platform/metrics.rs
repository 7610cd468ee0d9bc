//! Prometheus metrics of Nexus and Keeper: the name, help text and labels of every metric, the
//! registry that holds them, and the plain-HTTP listener that serves them.
//!
//! The listener is off unless `SPIKE_NEXUS_METRICS_ADDR` / `SPIKE_KEEPER_METRICS_ADDR` names
//! an address. It is bound first thing at start, so a busy address stops the process with a
//! line naming the variable, and it answers from then on, before the store is open and while
//! the root key is not loaded. It speaks plain HTTP without client certificates and answers
//! `GET /metrics` only: bind it to 127.0.0.1 or a scrape network. The body is the Prometheus
//! text format (0.0.4), or OpenMetrics when the scraper asks for it (`Accept:
//! application/openmetrics-text`, as Prometheus does).
//!
//! # Bounded labels
//! Every label value is a `&'static str` the code chose (an action name, a backend name), one
//! of the small enums here, a Keeper's position in `SPIKE_NEXUS_KEEPER_PEERS`, or an HTTP
//! status. A secret path, a caller's SPIFFE ID or anything else that arrives with a request
//! cannot become a label: the label types take no string made at run time.
//!
//! Instrumented code calls the small typed functions here ([`NexusMetrics::request`],
//! [`StoreOps::record`], [`Connections::opened`], ...) and never builds a label itself. Every
//! call is a few atomic operations and one hash-map lookup under a read lock; nothing
//! allocates once a label set has been seen.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The path metrics are served on.
pub const METRICS_PATH: &str = "/metrics";

/// Scrapes served at once; more connections wait in the kernel's backlog.
const MAX_SCRAPES: usize = 16;

/// Time a scraper has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The git commit this binary was built from, when the build could tell (`build.rs` asks the
/// local git, or takes `SPIKE_GIT_COMMIT` from the build environment).
pub const GIT_COMMIT: &str = match option_env!("SPIKE_GIT_COMMIT") {
    Some(c) => c,
    None => "unknown",
};

/// Declares a label enum: its values as `&'static str` and its Prometheus encoding.
macro_rules! label_enum {
    ($(#[$doc:meta])* pub enum $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vdoc])* $variant,)+ }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The label value.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
        }

        impl EncodeLabelValue for $name {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}

label_enum! {
    /// Why a server closed a connection without serving it.
    pub enum Refusal {
        /// Every connection slot was taken (`SPIKE_HTTP_SERVER_MAX_CONNECTIONS` and the reserve).
        ConnectionLimit => "connection_limit",
        /// Only a reserved slot was left, and the peer is not one it is kept for.
        ReservedForOperators => "reserved_for_operators",
        /// A caller without a certificate found its own allowance
        /// (`SPIKE_HTTP_SERVER_ANONYMOUS_CONNECTIONS`) taken.
        AnonymousLimit => "anonymous_limit",
        /// The TLS handshake failed (no or a refused certificate, protocol error).
        HandshakeFailed => "handshake_failed",
        /// The TLS handshake did not finish in `SPIKE_HTTP_SERVER_TLS_HANDSHAKE_TIMEOUT`.
        HandshakeTimeout => "handshake_timeout",
        /// Request headers did not arrive in `SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT`.
        HeaderTimeout => "header_timeout",
    }
}

label_enum! {
    /// One operation of the backing-store interface.
    pub enum StoreOp {
        /// A liveness check.
        Ping => "ping",
        /// A read of one value.
        Get => "get",
        /// A read of one value's revision.
        Revision => "revision",
        /// A conditional write.
        Put => "put",
        /// A conditional delete.
        Delete => "delete",
        /// A listing of keys.
        List => "list",
    }
}

label_enum! {
    /// How a store operation ended.
    pub enum StoreResult {
        /// It did what was asked.
        Ok => "ok",
        /// A conditional write or delete found another writer first (not an error: the caller
        /// retries from a fresh read).
        Conflict => "conflict",
        /// The store could not be reached or refused to work.
        Unavailable => "unavailable",
        /// The store answered with malformed data.
        Corrupt => "corrupt",
        /// The store cannot be used safely (an S3 server that ignores conditional writes).
        Incompatible => "incompatible",
    }
}

label_enum! {
    /// Where Nexus is in the root-key lifecycle (`/health`'s `status`).
    pub enum KeyState {
        /// Waiting for enough Keepers to answer.
        AwaitingKeepers => "awaiting_keepers",
        /// The Keepers lost the key: an operator must restore it from recovery shards.
        AwaitingRestore => "awaiting_restore",
        /// The store is not open yet, or could not be read.
        StoreUnavailable => "store_unavailable",
        /// The store holds an unfinished backup restore.
        RestoreIncomplete => "restore_incomplete",
        /// The store's keyring does not open under the root key (edited, or another key's).
        KeyringRefused => "keyring_refused",
        /// The root key is loaded.
        Ready => "ready",
    }
}

label_enum! {
    /// How pushing a Keeper its shard ended.
    pub enum PushResult {
        /// The Keeper took it.
        Ok => "ok",
        /// No answer, or a refusal.
        Failed => "failed",
    }
}

label_enum! {
    /// What a re-encryption pass did with one secret record.
    pub enum Reencryption {
        /// Rewritten under the current data key.
        Rewritten => "rewritten",
        /// Already wholly under it.
        Current => "current",
        /// Not rewritten (named in an error line; a later pass retries it).
        Failed => "failed",
    }
}

label_enum! {
    /// Where audit records go.
    pub enum AuditSink {
        /// One line per request on the log stream (target `spike::audit`).
        Stderr => "stderr",
        /// The audit file, `SPIKE_NEXUS_AUDIT_FILE`.
        File => "file",
    }
}

label_enum! {
    /// What became of one audit record.
    pub enum AuditResult {
        /// The sink took it.
        Written => "written",
        /// The sink failed to take it.
        Failed => "failed",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    action: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeeperRequestLabels {
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    backend: &'static str,
    op: StoreOp,
    result: StoreResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOpLabels {
    backend: &'static str,
    op: StoreOp,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: KeyState,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeeperLabels {
    keeper: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabels {
    keeper: u8,
    result: PushResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: Refusal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReencryptLabels {
    result: Reencryption,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: AuditSink,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditLabels {
    sink: AuditSink,
    result: AuditResult,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
    shard_derivation: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets in seconds: 0.5 ms to about 16 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Group-commit batch buckets: 1 to 128 puts (the batch limit), doubling.
fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 8))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `spike_build_info`: the version, the git commit and the shard derivation a new deployment
/// gets, as labels of a constant 1.
fn register_build_info(registry: &mut Registry, shard_derivation: &'static str) {
    registry.register(
        "spike_build",
        "The spike build: version, git commit, shard derivation of new deployments",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            commit: GIT_COMMIT,
            shard_derivation,
        }),
    );
}

/// A server's connection accounting (`spike_<role>_connections_*`), fed by the transport's
/// accept loop.
#[derive(Clone, Debug, Default)]
pub struct Connections {
    open: Gauge,
    accepted: Counter,
    refused: Family<CauseLabels, Counter>,
}

/// One accepted connection; the open-connections gauge goes down when it is dropped.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Connections {
    fn register(&self, registry: &mut Registry, role: &str) {
        registry.register(
            format!("spike_{role}_connections_open"),
            "Connections open now (TLS handshake included)",
            self.open.clone(),
        );
        registry.register(
            format!("spike_{role}_connections_accepted"),
            "Connections given a slot",
            self.accepted.clone(),
        );
        registry.register(
            format!("spike_{role}_connections_refused"),
            "Connections closed without being served, by cause",
            self.refused.clone(),
        );
    }

    /// A connection got a slot: it counts as open until the guard is dropped.
    pub fn opened(&self) -> OpenConnection {
        self.accepted.inc();
        self.open.inc();
        OpenConnection(self.open.clone())
    }

    /// A connection was closed without being served.
    pub fn refused(&self, cause: Refusal) {
        self.refused.get_or_create(&CauseLabels { cause }).inc();
    }
}

/// A server's own SVID (`spike_<role>_svid_*`), refreshed from its identity source: an alert
/// sees an SVID the agent has stopped renewing before it expires, and a process that has none.
#[derive(Clone, Debug, Default)]
pub struct SvidGauges {
    ready: Gauge,
    expiry: Gauge,
}

impl SvidGauges {
    fn register(&self, registry: &mut Registry, role: &str) {
        registry.register(
            format!("spike_{role}_svid_ready"),
            "1 while this process holds an unexpired SVID; 0 while it waits for its first, or once it has expired",
            self.ready.clone(),
        );
        registry.register(
            format!("spike_{role}_svid_expiry_timestamp_seconds"),
            "When the SVID in use expires, in Unix seconds (0 before the first)",
            self.expiry.clone(),
        );
    }

    /// The SVID's state now: usable or not, and when it expires (`None`: no SVID yet).
    pub fn set(&self, ready: bool, not_after: Option<SystemTime>) {
        self.ready.set(i64::from(ready));
        let expiry = not_after
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.expiry.set(expiry);
    }
}

/// Store operation counts and latencies (`spike_store_*`), fed at the store boundary.
#[derive(Clone, Debug)]
pub struct StoreOps {
    ops: Family<StoreLabels, Counter>,
    latency: Histograms<StoreOpLabels>,
}

impl Default for StoreOps {
    fn default() -> StoreOps {
        StoreOps {
            ops: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl StoreOps {
    /// One operation of `backend` that ended as `result` after `elapsed`.
    pub fn record(
        &self,
        backend: &'static str,
        op: StoreOp,
        result: StoreResult,
        elapsed: Duration,
    ) {
        self.ops
            .get_or_create(&StoreLabels {
                backend,
                op,
                result,
            })
            .inc();
        self.latency
            .get_or_create(&StoreOpLabels { backend, op })
            .observe(elapsed.as_secs_f64());
    }
}

/// Sizes of group-committed put batches (`spike_nexus_group_commit_batch_size`).
#[derive(Clone, Debug)]
pub struct BatchSizes(Histogram);

impl Default for BatchSizes {
    fn default() -> BatchSizes {
        BatchSizes(batch_histogram())
    }
}

impl BatchSizes {
    /// A batch of `puts` puts was written with one compare-and-set.
    pub fn observe(&self, puts: usize) {
        self.0.observe(puts as f64);
    }
}

/// Every metric of one Nexus instance, and the registry that serves them.
#[derive(Debug)]
pub struct NexusMetrics {
    registry: Arc<Registry>,
    /// The HTTPS server's connections.
    pub connections: Connections,
    /// This instance's SVID.
    pub svid: SvidGauges,
    /// The backing store's operations.
    pub store: StoreOps,
    /// Group-commit batch sizes.
    pub batches: BatchSizes,
    requests: Family<RequestLabels, Counter>,
    latency: Histograms<RouteLabels>,
    key_state: Family<StateLabels, Gauge>,
    key_state_since: Gauge,
    keeper_up: Family<KeeperLabels, Gauge>,
    keeper_shard_ok: Family<KeeperLabels, Gauge>,
    pushes: Family<PushLabels, Counter>,
    audit_healthy: Family<SinkLabels, Gauge>,
    audit_records: Family<AuditLabels, Counter>,
    data_key: Gauge,
    reencrypted: Family<ReencryptLabels, Counter>,
    rekeys: Counter,
    recovery_exported: Gauge,
}

impl NexusMetrics {
    /// The metrics of a Nexus whose new deployments get `shard_derivation`, and of its
    /// `keepers` Keepers; the root key is not loaded and the store not open yet.
    pub fn new(shard_derivation: &'static str, keepers: usize) -> NexusMetrics {
        let mut registry = Registry::default();
        register_build_info(&mut registry, shard_derivation);
        let m = NexusMetrics {
            registry: Arc::new(Registry::default()),
            connections: Connections::default(),
            svid: SvidGauges::default(),
            store: StoreOps::default(),
            batches: BatchSizes::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            key_state: Family::default(),
            key_state_since: Gauge::default(),
            keeper_up: Family::default(),
            keeper_shard_ok: Family::default(),
            pushes: Family::default(),
            audit_healthy: Family::default(),
            audit_records: Family::default(),
            data_key: Gauge::default(),
            reencrypted: Family::default(),
            rekeys: Counter::default(),
            recovery_exported: Gauge::default(),
        };
        m.connections.register(&mut registry, "nexus");
        m.svid.register(&mut registry, "nexus");
        let r = &mut registry;
        r.register(
            "spike_nexus_requests",
            "Requests answered, by route, action (secret.get, ...) and HTTP status; route and \
             action are \"none\" when the request named no known route",
            m.requests.clone(),
        );
        r.register(
            "spike_nexus_request_duration_seconds",
            "Time from a request's arrival to its answer, by route and action",
            m.latency.clone(),
        );
        r.register(
            "spike_store_operations",
            "Backing-store operations, by backend, operation and result",
            m.store.ops.clone(),
        );
        r.register(
            "spike_store_operation_duration_seconds",
            "Backing-store operation latency, by backend and operation",
            m.store.latency.clone(),
        );
        r.register(
            "spike_nexus_root_key_state",
            "1 for the root-key lifecycle state this instance is in, 0 for the others",
            m.key_state.clone(),
        );
        r.register(
            "spike_nexus_root_key_state_since_timestamp_seconds",
            "When this instance entered its current root-key state (Unix time)",
            m.key_state_since.clone(),
        );
        r.register(
            "spike_nexus_keeper_up",
            "1 when the Keeper (by position in SPIKE_NEXUS_KEEPER_PEERS) answered the last \
             shard read or push, 0 when it did not",
            m.keeper_up.clone(),
        );
        r.register(
            "spike_nexus_keeper_shard_ok",
            "1 when the Keeper is known to hold the shard of the loaded root key (its last \
             shard push succeeded), 0 otherwise",
            m.keeper_shard_ok.clone(),
        );
        r.register(
            "spike_nexus_shard_pushes",
            "Shard pushes to Keepers, by Keeper position and result",
            m.pushes.clone(),
        );
        r.register(
            "spike_nexus_group_commit_batch_size",
            "Puts of one path written together by one compare-and-set",
            m.batches.0.clone(),
        );
        r.register(
            "spike_nexus_audit_sink_healthy",
            "1 when the audit sink takes records, 0 when it fails",
            m.audit_healthy.clone(),
        );
        r.register(
            "spike_nexus_audit_records",
            "Audit records, by sink and result",
            m.audit_records.clone(),
        );
        r.register(
            "spike_nexus_data_key_current",
            "The id of the data key this instance seals new values under (decision 33)",
            m.data_key.clone(),
        );
        r.register(
            "spike_nexus_rekeys",
            "Rekeys this instance finished (its own or one it took over; decision 34)",
            m.rekeys.clone(),
        );
        r.register(
            "spike_nexus_recovery_shards_exported",
            "1 when the recovery shards of the current root key have been exported (spike \
             recover export), 0 when not since the key was created or replaced by a rekey",
            m.recovery_exported.clone(),
        );
        r.register(
            "spike_nexus_reencrypted_records",
            "Secret records seen by re-encryption passes on this instance, by result",
            m.reencrypted.clone(),
        );
        for position in 1..=keepers {
            let keeper = u8::try_from(position).unwrap_or(u8::MAX);
            m.keeper_up.get_or_create(&KeeperLabels { keeper }).set(0);
            m.keeper_shard_ok
                .get_or_create(&KeeperLabels { keeper })
                .set(0);
        }
        // Today's sink is the log stream, which does not report failures: healthy.
        m.audit_sink_health(AuditSink::Stderr, true);
        m.key_state(KeyState::StoreUnavailable);
        NexusMetrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// The registry, for [`serve`].
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// A request answered with `status` after `elapsed`. `route` and `action` are names the
    /// code chose (`"secrets"`, `"secret.get"`), `"none"` when the request named no route.
    pub fn request(
        &self,
        route: &'static str,
        action: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                route,
                action,
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route, action })
            .observe(elapsed.as_secs_f64());
    }

    /// New values are sealed under data key `id`.
    pub fn data_key(&self, id: u32) {
        self.data_key.set(i64::from(id));
    }

    /// This instance finished a rekey.
    pub fn rekeyed(&self) {
        self.rekeys.inc();
    }

    /// Whether the current root key's recovery shards have been exported.
    pub fn recovery_exported(&self, exported: bool) {
        self.recovery_exported.set(i64::from(exported));
    }

    /// A re-encryption pass did `result` with one record.
    pub fn reencrypted(&self, result: Reencryption) {
        self.reencrypted
            .get_or_create(&ReencryptLabels { result })
            .inc();
    }

    /// The root-key lifecycle is in `state`; when that is a change, it began now.
    pub fn key_state(&self, state: KeyState) {
        let current = self.key_state.get_or_create(&StateLabels { state }).get() == 1;
        if current && self.key_state_since.get() != 0 {
            return;
        }
        for s in KeyState::ALL {
            self.key_state
                .get_or_create(&StateLabels { state: *s })
                .set(i64::from(*s == state));
        }
        self.key_state_since.set(unix_now());
    }

    /// Whether the Keeper at `position` (1-based) answered the last call.
    pub fn keeper_reachable(&self, position: u8, up: bool) {
        self.keeper_up
            .get_or_create(&KeeperLabels { keeper: position })
            .set(i64::from(up));
    }

    /// Whether the Keeper at `position` is known to hold the loaded key's shard.
    pub fn keeper_shard(&self, position: u8, right: bool) {
        self.keeper_shard_ok
            .get_or_create(&KeeperLabels { keeper: position })
            .set(i64::from(right));
    }

    /// A shard push to the Keeper at `position` ended; also updates its reachability and
    /// whether it holds the right shard.
    pub fn shard_push(&self, position: u8, ok: bool) {
        let result = if ok {
            PushResult::Ok
        } else {
            PushResult::Failed
        };
        self.pushes
            .get_or_create(&PushLabels {
                keeper: position,
                result,
            })
            .inc();
        self.keeper_reachable(position, ok);
        self.keeper_shard(position, ok);
    }

    /// Whether `sink` takes records.
    pub fn audit_sink_health(&self, sink: AuditSink, healthy: bool) {
        self.audit_healthy
            .get_or_create(&SinkLabels { sink })
            .set(i64::from(healthy));
    }

    /// One audit record went to `sink`.
    pub fn audit_record(&self, sink: AuditSink, result: AuditResult) {
        self.audit_records
            .get_or_create(&AuditLabels { sink, result })
            .inc();
    }
}

/// Every metric of one Keeper, and the registry that serves them.
#[derive(Debug)]
pub struct KeeperMetrics {
    registry: Arc<Registry>,
    /// The HTTPS server's connections.
    pub connections: Connections,
    /// This Keeper's SVID.
    pub svid: SvidGauges,
    requests: Family<KeeperRequestLabels, Counter>,
    shard_held: Gauge,
    shard_index: Gauge,
    contributions: Counter,
}

impl KeeperMetrics {
    /// The metrics of a Keeper holding no shard; `shard_derivation` is the build's default.
    pub fn new(shard_derivation: &'static str) -> KeeperMetrics {
        let mut registry = Registry::default();
        register_build_info(&mut registry, shard_derivation);
        let m = KeeperMetrics {
            registry: Arc::new(Registry::default()),
            connections: Connections::default(),
            svid: SvidGauges::default(),
            requests: Family::default(),
            shard_held: Gauge::default(),
            shard_index: Gauge::default(),
            contributions: Counter::default(),
        };
        m.connections.register(&mut registry, "keeper");
        m.svid.register(&mut registry, "keeper");
        registry.register(
            "spike_keeper_requests",
            "Requests answered, by route (contribute, shard, none) and HTTP status",
            m.requests.clone(),
        );
        registry.register(
            "spike_keeper_shard_held",
            "1 when this Keeper holds a shard",
            m.shard_held.clone(),
        );
        registry.register(
            "spike_keeper_shard_index",
            "The Shamir index of the shard held (0: none, or Nexus sent no index)",
            m.shard_index.clone(),
        );
        registry.register(
            "spike_keeper_shard_contributions",
            "Shards accepted from Nexus (pushes, including unchanged refreshes)",
            m.contributions.clone(),
        );
        KeeperMetrics {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// The registry, for [`serve`].
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.registry)
    }

    /// A request to `route` (`"contribute"`, `"shard"`, `"none"`) answered with `status`.
    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&KeeperRequestLabels { route, status })
            .inc();
    }

    /// Nexus sent a shard (with `index`, if it sent one), and this Keeper now holds it.
    pub fn shard_accepted(&self, index: Option<u8>) {
        self.contributions.inc();
        self.shard_held.set(1);
        self.shard_index.set(index.map_or(0, i64::from));
    }
}

/// The metrics listener could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr} ({var}): {source}")]
pub struct BindError {
    /// The variable that named the address.
    pub var: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    pub source: std::io::Error,
}

/// Binds the metrics listener at `addr` (named by the variable `var`), and returns it with the
/// address it really got (port 0 resolved).
pub async fn bind(
    var: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), BindError> {
    let listener =
        TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { var, addr, source })?;
    let bound = listener.local_addr().unwrap_or(addr);
    Ok((listener, bound))
}

/// Owns the metrics server; stops accepting on drop.
#[derive(Debug)]
pub struct ServerGuard(tokio::task::JoinHandle<()>);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `registry` on `listener` (plain HTTP, `GET /metrics`) until the guard is dropped.
pub fn serve(listener: TcpListener, registry: Arc<Registry>) -> ServerGuard {
    ServerGuard(tokio::spawn(accept_loop(listener, registry)))
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let resp = answer(&req, &registry);
                async move { Ok::<_, Infallible>(resp) }
            });
            // One request per connection: nothing outlives the guard for long.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
}

/// The answer to one request of the metrics listener.
fn answer(req: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    if req.uri().path() != METRICS_PATH {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    let openmetrics = req.headers().get_all(ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    let mut body = String::new();
    let (encoded, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut body, registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    if encoded.is_err() {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n");
    }
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry).unwrap();
        out
    }

    #[test]
    fn nexus_metrics_start_in_a_known_state() {
        let m = NexusMetrics::new("rejection_sampling", 3);
        let out = text(&m.registry());
        assert!(out.contains("spike_build_info{"), "{out}");
        assert!(
            out.contains("shard_derivation=\"rejection_sampling\""),
            "{out}"
        );
        assert!(
            out.contains("spike_nexus_root_key_state{state=\"store_unavailable\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("spike_nexus_root_key_state{state=\"ready\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("spike_nexus_keeper_up{keeper=\"3\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("spike_nexus_audit_sink_healthy{sink=\"stderr\"} 1"),
            "{out}"
        );
    }

    #[test]
    fn counters_and_the_open_connection_gauge_move() {
        let m = NexusMetrics::new("rejection_sampling", 1);
        m.request("secrets", "secret.get", 200, Duration::from_millis(3));
        m.request("secrets", "secret.get", 200, Duration::from_millis(3));
        m.store.record(
            "memory",
            StoreOp::Put,
            StoreResult::Conflict,
            Duration::ZERO,
        );
        let open = m.connections.opened();
        m.connections.refused(Refusal::HandshakeFailed);
        let out = text(&m.registry());
        assert!(
            out.contains(
                "spike_nexus_requests_total{route=\"secrets\",action=\"secret.get\",status=\"200\"} 2"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "spike_store_operations_total{backend=\"memory\",op=\"put\",result=\"conflict\"} 1"
            ),
            "{out}"
        );
        assert!(out.contains("spike_nexus_connections_open 1"), "{out}");
        assert!(
            out.contains("spike_nexus_connections_refused_total{cause=\"handshake_failed\"} 1"),
            "{out}"
        );
        drop(open);
        assert!(text(&m.registry()).contains("spike_nexus_connections_open 0"));
    }

    #[test]
    fn the_state_since_moves_only_when_the_state_changes() {
        let m = NexusMetrics::new("rejection_sampling", 1);
        m.key_state(KeyState::AwaitingKeepers);
        m.key_state_since.set(7);
        // awaiting_keepers with another shard count is the same state.
        m.key_state(KeyState::AwaitingKeepers);
        assert_eq!(m.key_state_since.get(), 7);
        m.key_state(KeyState::Ready);
        assert!(m.key_state_since.get() > 7);
        let out = text(&m.registry());
        assert!(
            out.contains("spike_nexus_root_key_state{state=\"ready\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("spike_nexus_root_key_state{state=\"awaiting_keepers\"} 0"),
            "{out}"
        );
    }
}
