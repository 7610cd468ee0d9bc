//! The audit sink: `SPIKE_NEXUS_AUDIT_FILE`, one chained, MACed JSON line per API request
//! (the format is [`crate::protocol::audit`]).
//!
//! Requests never touch the file. They hand their record to one writer thread over a bounded
//! queue, so a sink that fails (disk full) or blocks (a hung mount) costs a request at most
//! [`AuditConfig::timeout`]:
//! - **fail-closed** (the default, as Vault): a request is answered only once its record is in
//!   the file; if that does not happen within the timeout the answer is 503 `audit_unavailable`
//!   instead (a read's secret is withheld; a write may have happened, and a retry with the same
//!   request id is idempotent). While the sink is failing, new requests get that 503 at once
//!   without doing anything, and `/health` answers 503 `audit_unavailable`.
//! - **best-effort**: requests never wait; records that cannot be queued or written are
//!   counted and a `gap` record says how many when the sink works again.
//!
//! A record that failed to be written stays queued and is written when the sink recovers (a
//! partly written line is cut back first), so the chain in the file never breaks. SIGHUP
//! reopens the file (logrotate).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Keys;
use crate::platform::env::{self, Source};
use crate::protocol::audit::{self, Kind, Record};
use crate::protocol::nexus::{now_nanos, rfc3339};

/// How the sink's failures reach requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A request is answered only once its record is written (503 otherwise).
    FailClosed,
    /// Requests never wait for the sink; lost records are counted.
    BestEffort,
}

/// `SPIKE_NEXUS_AUDIT_*`.
#[derive(Clone, Debug)]
pub struct AuditConfig {
    /// `SPIKE_NEXUS_AUDIT_FILE`: the trail; none means the audit line on stderr only.
    pub file: Option<PathBuf>,
    /// `SPIKE_NEXUS_AUDIT_MODE`: `fail-closed` (default) or `best-effort`.
    pub mode: Mode,
    /// `SPIKE_NEXUS_AUDIT_TIMEOUT`: how long a request waits for its record (fail-closed), and
    /// how long one write may take before the sink counts as blocked.
    pub timeout: Duration,
}

impl AuditConfig {
    /// Reads `SPIKE_NEXUS_AUDIT_FILE`, `SPIKE_NEXUS_AUDIT_MODE` and `SPIKE_NEXUS_AUDIT_TIMEOUT`.
    pub fn from_source(env: &impl Source) -> env::Result<AuditConfig> {
        let defaults = AuditConfig::default();
        let file = env
            .get("SPIKE_NEXUS_AUDIT_FILE")
            .filter(|f| !f.trim().is_empty())
            .map(PathBuf::from);
        if let Some(path) = &file
            && !path.is_absolute()
        {
            return Err(env::invalid(
                "SPIKE_NEXUS_AUDIT_FILE",
                format!("{} is not an absolute path", path.display()),
            ));
        }
        let mode = match env
            .get("SPIKE_NEXUS_AUDIT_MODE")
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
            .as_str()
        {
            "" | "fail-closed" => Mode::FailClosed,
            "best-effort" => Mode::BestEffort,
            other => {
                return Err(env::invalid(
                    "SPIKE_NEXUS_AUDIT_MODE",
                    format!("{other:?} is not fail-closed or best-effort"),
                ));
            }
        };
        let timeout = env::duration(env, "SPIKE_NEXUS_AUDIT_TIMEOUT", defaults.timeout)?;
        if timeout.is_zero() {
            return Err(env::invalid(
                "SPIKE_NEXUS_AUDIT_TIMEOUT",
                "must be longer than zero",
            ));
        }
        Ok(AuditConfig {
            file,
            mode,
            timeout,
        })
    }
}

impl Default for AuditConfig {
    fn default() -> AuditConfig {
        AuditConfig {
            file: None,
            mode: Mode::FailClosed,
            timeout: Duration::from_secs(2),
        }
    }
}

/// Records queued between requests and the writer before requests are refused (fail-closed)
/// or records are dropped (best-effort).
const QUEUE: usize = 4096;
/// Bytes of written-but-unflushed records kept while the sink fails, at most.
const MAX_PENDING_BYTES: usize = 8 << 20;
/// How often a failing sink is tried again.
const RETRY: Duration = Duration::from_millis(500);

/// The sink's state, as `/health` and the refusals say it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// No audit file is configured.
    Off,
    /// Records are being written.
    Ok,
    /// The last write failed: why.
    Failing(String),
    /// A write has been under way for longer than the timeout.
    Blocked,
}

impl Health {
    /// The name on `/health`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Off => "off",
            Health::Ok => "ok",
            Health::Failing(_) => "failing",
            Health::Blocked => "blocked",
        }
    }
}

/// What the writer thread shares with requests.
#[derive(Default)]
struct Shared {
    /// The error of the last write, until a write succeeds.
    failing: Mutex<Option<String>>,
    /// When the write under way started.
    busy_since: Mutex<Option<Instant>>,
    /// Records lost (best-effort) since start.
    dropped: AtomicU64,
    /// A SIGHUP asked for the file to be reopened: kept here, not only in the queue, so that a
    /// full queue (a sink that blocks) does not lose it.
    reopen: AtomicBool,
}

enum Message {
    Record(Box<Record>, Option<Arc<Keys>>, Option<oneshot::Sender<()>>),
    Reopen,
}

/// Nexus's audit trail; cheap to share.
pub struct Trail {
    config: AuditConfig,
    queue: Option<SyncSender<Message>>,
    shared: Arc<Shared>,
    instance: String,
}

/// Why a request's record was not written in time (fail-closed).
#[derive(Debug, thiserror::Error)]
#[error("the audit trail is not being written: {0}")]
pub struct Unavailable(pub String);

impl Trail {
    /// A trail that writes nothing (no `SPIKE_NEXUS_AUDIT_FILE`).
    pub fn off() -> Trail {
        Trail {
            config: AuditConfig::default(),
            queue: None,
            shared: Arc::default(),
            instance: String::new(),
        }
    }

    /// Opens the file (creating it 0600) and starts the writer thread. `instance` names this
    /// Nexus in every record.
    pub fn open(config: AuditConfig, instance: String) -> std::io::Result<Trail> {
        let Some(path) = config.file.clone() else {
            return Ok(Trail::off());
        };
        let shared = Arc::<Shared>::default();
        let mut writer = Writer::open(path, instance.clone(), Arc::clone(&shared))?;
        let (queue, rx) = std::sync::mpsc::sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("spike-audit".into())
            .spawn(move || writer.run(rx))?;
        Ok(Trail {
            config,
            queue: Some(queue),
            shared,
            instance,
        })
    }

    /// The sink's state now.
    pub fn health(&self) -> Health {
        if self.queue.is_none() {
            return Health::Off;
        }
        if let Some(since) = *lock(&self.shared.busy_since)
            && since.elapsed() > self.config.timeout
        {
            return Health::Blocked;
        }
        match lock(&self.shared.failing).clone() {
            Some(why) => Health::Failing(why),
            None => Health::Ok,
        }
    }

    /// Whether requests must be refused because their records cannot be written (fail-closed
    /// with a failing or blocked sink).
    pub fn refuses(&self) -> Option<Unavailable> {
        if self.config.mode != Mode::FailClosed {
            return None;
        }
        match self.health() {
            Health::Off | Health::Ok => None,
            Health::Blocked => Some(Unavailable("a write has not returned".into())),
            Health::Failing(why) => Some(Unavailable(why)),
        }
    }

    /// Records lost in best-effort mode since start.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Asks the writer to reopen the file (after logrotate moved it).
    pub fn reopen(&self) {
        if let Some(queue) = &self.queue {
            self.shared.reopen.store(true, Ordering::SeqCst);
            // Only wakes the writer: a full queue means it is busy, and it looks at the flag
            // after every batch.
            let _ = queue.try_send(Message::Reopen);
        }
    }

    /// Writes the record of one request. Fail-closed: returns once it is in the file, or fails
    /// after the timeout. Best-effort: returns at once.
    #[allow(clippy::too_many_arguments)]
    pub async fn request(
        &self,
        keys: Option<Arc<Keys>>,
        request_id: &str,
        caller: &str,
        action: &str,
        resource: &str,
        status: u16,
        micros: u64,
    ) -> Result<(), Unavailable> {
        let Some(queue) = &self.queue else {
            return Ok(());
        };
        let record = Box::new(Record {
            kind: Kind::Request,
            seq: 0,
            time: String::new(),
            instance: self.instance.clone(),
            request_id: request_id.into(),
            caller: caller.into(),
            action: action.into(),
            resource: resource.into(),
            status: Some(status),
            micros: Some(micros),
            detail: String::new(),
            key_id: None,
            prev: String::new(),
        });
        match self.config.mode {
            Mode::BestEffort => {
                if queue.try_send(Message::Record(record, keys, None)).is_err() {
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Mode::FailClosed => {
                let (done, written) = oneshot::channel();
                match queue.try_send(Message::Record(record, keys, Some(done))) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        return Err(Unavailable("the audit queue is full".into()));
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        return Err(Unavailable("the audit writer stopped".into()));
                    }
                }
                match tokio::time::timeout(self.config.timeout, written).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(Unavailable("the record was not written".into())),
                    Err(_) => Err(Unavailable(match self.health() {
                        Health::Failing(why) => why,
                        _ => format!("not written within {:?}", self.config.timeout),
                    })),
                }
            }
        }
    }
}

/// Request ids: a random prefix per process and a counter, so ids from instances behind one
/// load balancer do not collide.
pub struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    /// A fresh prefix.
    pub fn new() -> RequestIds {
        let mut bytes = [0u8; 4];
        // Only for telling instances apart; a clock-based fallback is fine if there is no
        // randomness.
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
            bytes = now_nanos().to_le_bytes()[..4]
                .try_into()
                .unwrap_or_default();
        }
        RequestIds {
            prefix: audit::hex(&bytes),
            next: AtomicU64::new(1),
        }
    }

    /// The next id.
    pub fn next(&self) -> String {
        format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

impl Default for RequestIds {
    fn default() -> RequestIds {
        RequestIds::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The writer thread's state: the file, the chain, and what is not written yet.
struct Writer {
    path: PathBuf,
    file: Option<File>,
    instance: String,
    shared: Arc<Shared>,
    /// Digest of the last line chained, and its seq.
    prev: [u8; 32],
    seq: u64,
    /// The latest key material seen, for records the writer makes itself.
    keys: Option<Arc<Keys>>,
    /// Chained lines not yet in the file, and the requests waiting for them.
    pending: Vec<u8>,
    waiting: Vec<oneshot::Sender<()>>,
    /// Records dropped since the last `gap` record.
    lost: u64,
}

impl Writer {
    fn open(path: PathBuf, instance: String, shared: Arc<Shared>) -> std::io::Result<Writer> {
        let mut writer = Writer {
            path,
            file: None,
            instance,
            shared,
            prev: audit::GENESIS,
            seq: 0,
            keys: None,
            pending: Vec::new(),
            waiting: Vec::new(),
            lost: 0,
        };
        let file = writer.open_file()?;
        // Continue the chain of a file written before (this instance restarted). A torn last
        // line (a crash in the middle of a write) is ended, so it stays a line of its own that
        // the verifier reports, and the chain starts again after it.
        match last_line(&writer.path)? {
            Tail::Empty => {}
            Tail::Line(last) => {
                writer.prev = audit::digest_of(&last);
                writer.seq = audit::parse(&last).map_or(0, |p| p.record.seq);
            }
            Tail::Torn => writer.pending.push(b'\n'),
        }
        writer.file = Some(file);
        writer.chain(Kind::Open, audit::OPEN_START.into());
        writer.flush();
        Ok(writer)
    }

    fn open_file(&self) -> std::io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
    }

    fn run(&mut self, rx: Receiver<Message>) {
        loop {
            // A reopen that failed is retried as a failed write is.
            let first = if self.pending.is_empty() && !self.shared.reopen.load(Ordering::SeqCst) {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(RETRY)
            };
            match first {
                Ok(message) => self.take(message),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.flush();
                    return;
                }
            }
            // Everything queued meanwhile goes out in the same write.
            while let Ok(message) = rx.try_recv() {
                self.take(message);
            }
            self.reopen_if_asked();
            self.flush();
        }
    }

    fn take(&mut self, message: Message) {
        match message {
            Message::Reopen => self.reopen_if_asked(),
            Message::Record(record, keys, done) => {
                if keys.is_some() {
                    self.keys = keys;
                }
                if self.pending.len() > MAX_PENDING_BYTES {
                    self.lost += 1;
                    self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if self.lost > 0 {
                    let lost = std::mem::take(&mut self.lost);
                    self.chain(Kind::Gap, format!("{lost} records lost"));
                }
                self.append(*record);
                self.waiting.extend(done);
            }
        }
    }

    /// Chains a record the writer makes itself.
    fn chain(&mut self, kind: Kind, detail: String) {
        self.append(Record {
            kind,
            seq: 0,
            time: String::new(),
            instance: self.instance.clone(),
            request_id: String::new(),
            caller: String::new(),
            action: String::new(),
            resource: String::new(),
            status: None,
            micros: None,
            detail,
            key_id: None,
            prev: String::new(),
        });
    }

    /// Numbers, stamps, chains and MACs `record`, and queues its line.
    fn append(&mut self, mut record: Record) {
        self.seq += 1;
        record.seq = self.seq;
        record.time = rfc3339(now_nanos());
        record.prev = audit::hex(&self.prev);
        let key = self.keys.as_ref().map(|k| &k.audit);
        record.key_id = self.keys.as_ref().map(|k| k.key_id.clone());
        let line = audit::line(&record, key);
        self.prev = audit::digest_of(&line);
        self.pending.extend_from_slice(line.as_bytes());
        self.pending.push(b'\n');
    }

    /// Writes what is pending, all or nothing: a write that fails part-way is cut back so the
    /// file never holds half a line.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let Some(file) = self.file.as_mut() else {
            self.failed("the audit file is not open".into());
            return;
        };
        *lock(&self.shared.busy_since) = Some(Instant::now());
        // Where the file ends now (none for a pipe, which cannot be cut back).
        let before = file.seek(SeekFrom::End(0)).ok();
        let result = file.write_all(&self.pending).inspect_err(|_| {
            if let Some(before) = before {
                let _ = file.set_len(before);
            }
        });
        *lock(&self.shared.busy_since) = None;
        match result {
            Ok(()) => {
                self.pending.clear();
                if lock(&self.shared.failing).take().is_some() {
                    tracing::info!(path = %self.path.display(), "audit trail written again");
                }
                for done in self.waiting.drain(..) {
                    let _ = done.send(());
                }
            }
            Err(e) => self.failed(format!("cannot write {}: {e}", self.path.display())),
        }
    }

    fn failed(&mut self, why: String) {
        let mut failing = lock(&self.shared.failing);
        if failing.as_deref() != Some(why.as_str()) {
            tracing::error!(error = %why, "audit trail write failed; retrying");
            *failing = Some(why);
        }
    }

    /// Reopens the file if a SIGHUP asked for it since the last reopen.
    fn reopen_if_asked(&mut self) {
        if self.shared.reopen.swap(false, Ordering::SeqCst) {
            self.reopen();
        }
    }

    /// SIGHUP: pending lines go to the new file, which continues the chain.
    fn reopen(&mut self) {
        self.flush();
        // Opening can block too (a FIFO, a hung mount): it counts as a write under way.
        *lock(&self.shared.busy_since) = Some(Instant::now());
        let opened = self.open_file();
        *lock(&self.shared.busy_since) = None;
        match opened {
            Ok(file) => {
                self.file = Some(file);
                tracing::info!(path = %self.path.display(), "audit file reopened");
                self.chain(Kind::Open, "reopen".into());
            }
            Err(e) => {
                // Asked again: the writer tries every RETRY until it opens (lines meanwhile go
                // to the file it has, so best-effort loses nothing; fail-closed refuses
                // requests while this is failing).
                self.shared.reopen.store(true, Ordering::SeqCst);
                self.failed(format!("cannot reopen {}: {e}", self.path.display()));
            }
        }
    }
}

/// How a file ends.
enum Tail {
    /// It is empty.
    Empty,
    /// With this complete line.
    Line(String),
    /// In the middle of a line.
    Torn,
}

/// How the file at `path` ends (read once, at start).
fn last_line(path: &std::path::Path) -> std::io::Result<Tail> {
    const TAIL: u64 = 64 * 1024;
    let mut file = File::open(path)?;
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(Tail::Empty);
    }
    file.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut tail = Vec::new();
    file.take(TAIL).read_to_end(&mut tail)?;
    let text = String::from_utf8_lossy(&tail);
    Ok(match text.strip_suffix('\n') {
        Some(body) => Tail::Line(body.rsplit('\n').next().unwrap_or_default().to_string()),
        None => Tail::Torn,
    })
}
