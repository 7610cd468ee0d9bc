//! `spike dev`: a complete local system in one process — a dev PKI, three Keepers and one Nexus
//! on 127.0.0.1 — built from the same [`crate::identity::pki`], [`crate::keeper::run`] and
//! [`crate::nexus::run`] code the production subcommands use. Nothing here is a second
//! implementation: this module only mints certificates, builds the configurations (through
//! each part's's own parser, so validation stays in one place), runs the four servers as
//! tasks of one runtime with a shared shutdown, and prints how to use the result.
//!
//! Files under `DIR` (default `.spike-dev`):
//!
//! | path | what |
//! |---|---|
//! | `ca/ca.pem`, `ca/ca.key` | the dev trust-domain CA |
//! | `nexus/`, `keeper-1/`..`keeper-3/` | server SVIDs (spiffe-helper layout) |
//! | `superuser/`, `recover/`, `restore/` | operator SVIDs |
//! | `data/spike.db` | the SQLite store (not with `--ephemeral`) |
//! | `dev-root-key-shards` | dev only, mode 0600: `threshold` Keeper shards (see below) |
//!
//! **Restarts.** The Keepers run in this process, so their shards vanish when it exits, and a
//! Nexus that finds the store's verifier but no shards would wait for a restore
//! (`awaiting_restore`, DESIGN.md §1.4). For the dev case only, `spike dev` keeps `threshold`
//! Keeper shards in `DIR/dev-root-key-shards` (0600, SPIKE's recovery text format, one
//! `spike:<i>:<hex>` line per shard) and, on every start, hands them to the Keepers
//! (`/v1/store/contribute`) before Nexus starts, so Nexus rebuilds the key from the Keepers in
//! the ordinary way. That file is the root key in all but name: dev mode is not for production,
//! and `spike dev` says so at start. `--ephemeral` (memory store) writes no shards file.
//!
//! **The file is durable before the key is** (issue 13.9). On a new deployment `spike dev`
//! makes the root key itself, writes the file (fsynced, renamed into place, directory fsynced),
//! and only then gives the Keepers its shards; Nexus finds shards and no verifier, adopts that
//! key and writes its verifier. A kill before the file exists leaves nothing that knows the
//! key; a kill after it leaves a file the next start preloads. So a store whose verifier has
//! no shards file comes only from an older `spike dev` killed between the two steps, or from a
//! deleted file. The next start then looks inside the store: with nothing in it but the
//! verifier, no secret can be lost, so the store is moved aside to `data.orphaned-<time>` (not
//! deleted) and a new deployment starts; with secrets or policies in it, `spike dev` destroys
//! nothing, explains the two ways out (restore with recovery shards through the running
//! instance, which then saves the file, or remove the data directory) and waits in
//! `awaiting_restore`.

use std::collections::HashMap;
use std::fs::DirBuilder;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{StatusCode, Uri};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::{mpsc, watch};
use zeroize::Zeroizing;

use crate::client::keeper::{KeeperClient, ShardAnswer};
use crate::crypto::{RootKey, Share, decode_recovery_shard, encode_recovery_shard};
use crate::entry::cli::DevArgs;
use crate::identity::{self, ExpectedPeer, Role, SpiffeId, SvidPaths, SvidSource, pki};
use crate::keeper::KeeperConfig;
use crate::nexus::NexusConfig;
use crate::platform::CommandError;
use crate::platform::env::{self, Source};
use crate::store::{AnyStore, Namespace, Store};
use crate::transport::{HttpsClient, Timeouts};

/// Name of the dev-only shards file inside `DIR`.
pub const SHARDS_FILE: &str = "dev-root-key-shards";
/// Shamir parameters of the dev system.
const SHARES: u8 = 3;
const THRESHOLD: u8 = 2;
/// How long Keepers get to start listening, and the Keepers to be refilled after the key loads.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long the components get to stop after the shutdown signal.
const STOP_LIMIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

/// Why `spike dev` stopped ([`CommandError`]: `Usage` exits 2, `Failed` 1).
pub type Error = CommandError;

fn runtime(e: impl std::fmt::Display) -> Error {
    CommandError::failed(e)
}

/// The SVIDs `spike dev` mints: directory name under `DIR`, SPIFFE ID path.
const IDENTITIES: &[(&str, &str)] = &[
    ("nexus", "/spike/nexus"),
    ("keeper-1", "/spike/keeper/1"),
    ("keeper-2", "/spike/keeper/2"),
    ("keeper-3", "/spike/keeper/3"),
    ("superuser", "/spike/pilot/role/superuser"),
    ("recover", "/spike/pilot/role/recover"),
    ("restore", "/spike/pilot/role/restore"),
];

/// Settings a user may still give through the environment; everything else is fixed by `spike
/// dev` (in particular no `SPIKE_SVID_*` override leaks in from a shell set up as a client).
const PASS_THROUGH: &[&str] = &[
    "SPIKE_NEXUS_MAX_SECRET_VERSIONS",
    "SPIKE_NEXUS_MAX_BODY_BYTES",
    "SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL",
];

/// The configuration source of one dev component: its own map, then the pass-through variables.
struct DevEnv(HashMap<String, String>);

impl Source for DevEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned().or_else(|| {
            if PASS_THROUGH.contains(&name) {
                env::ProcessEnv.get(name)
            } else {
                None
            }
        })
    }
}

fn dev_env(pairs: &[(&str, String)]) -> DevEnv {
    DevEnv(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect(),
    )
}

/// Where everything lives and how it is wired.
struct Layout {
    dir: PathBuf,
    trust_domain: String,
    ephemeral: bool,
    nexus_port: u16,
    keeper_ports: [u16; 3],
}

impl Layout {
    fn svid(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    fn shards_file(&self) -> PathBuf {
        self.dir.join(SHARDS_FILE)
    }
    fn keeper_url(&self, i: usize) -> Result<Uri, Error> {
        format!("https://127.0.0.1:{}", self.keeper_ports[i])
            .parse()
            .map_err(runtime)
    }
    fn nexus_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.nexus_port)
    }
}

fn layout(args: &DevArgs) -> Result<Layout, Error> {
    let keeper_ports: [u16; 3] = args.keeper_ports.as_slice().try_into().map_err(|_| {
        Error::Usage(format!(
            "--keeper-ports takes exactly 3 ports (P1,P2,P3), got {}",
            args.keeper_ports.len()
        ))
    })?;
    let mut all = keeper_ports.to_vec();
    all.push(args.nexus_port);
    all.sort_unstable();
    if all.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::Usage(
            "--nexus-port and --keeper-ports must be four different ports".into(),
        ));
    }
    let trust_domain = crate::identity::config::trust_domain(&env::ProcessEnv)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let dir = std::path::absolute(&args.dir)
        .map_err(|e| Error::Usage(format!("--dir {}: {e}", args.dir.display())))?;
    Ok(Layout {
        dir,
        trust_domain,
        ephemeral: args.ephemeral,
        nexus_port: args.nexus_port,
        keeper_ports,
    })
}

/// Mints the CA on first use and any SVID directory that is missing.
fn ensure_pki(l: &Layout) -> Result<(), Error> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&l.dir)
        .map_err(|e| runtime(format!("cannot create {}: {e}", l.dir.display())))?;
    let ca = l.ca_dir();
    if !ca.join(pki::CA_KEY_FILE).exists() {
        pki::init(&ca, &l.trust_domain).map_err(runtime)?;
        eprintln!(
            "spike dev: created a CA for trust domain {} in {}",
            l.trust_domain,
            ca.display()
        );
    }
    let dns = ["localhost".to_string()];
    let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST)];
    for (name, path) in IDENTITIES {
        let out = l.svid(name);
        if out.join("svid.pem").exists() && out.join("svid_key.pem").exists() {
            continue;
        }
        let id = SpiffeId::parse(&format!("spiffe://{}{path}", l.trust_domain))
            .map_err(|e| Error::Usage(e.to_string()))?;
        pki::issue(&ca, &id, &out, &dns, &ips).map_err(runtime)?;
        eprintln!("spike dev: issued {id} in {}", out.display());
    }
    Ok(())
}

fn load_svid(dir: PathBuf) -> Result<Arc<SvidSource>, Error> {
    SvidSource::load(SvidPaths::resolve(Some(dir), None, None, None).map_err(runtime)?)
        .map_err(runtime)
}

fn ca_roots(l: &Layout) -> Result<Vec<CertificateDer<'static>>, Error> {
    let path = l.ca_dir().join(pki::CA_CERT_FILE);
    let roots = CertificateDer::pem_file_iter(&path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| runtime(format!("cannot read {}: {e}", path.display())))?;
    Ok(roots)
}

fn client(tls: Arc<rustls::ClientConfig>) -> HttpsClient {
    HttpsClient::new(
        tls,
        Timeouts {
            connect: Duration::from_secs(2),
            handshake: Duration::from_secs(2),
            request: Duration::from_secs(5),
            max_response: 1 << 20,
        },
    )
}

fn keeper_configs(l: &Layout) -> Result<Vec<KeeperConfig>, Error> {
    (0..3)
        .map(|i| {
            KeeperConfig::from_source(&dev_env(&[
                (
                    "SPIKE_SVID_DIR",
                    l.svid(&format!("keeper-{}", i + 1)).display().to_string(),
                ),
                ("SPIKE_TRUST_ROOT", l.trust_domain.clone()),
                (
                    "SPIKE_KEEPER_TLS_PORT",
                    format!("127.0.0.1:{}", l.keeper_ports[i]),
                ),
            ]))
            .map_err(|e| Error::Usage(e.to_string()))
        })
        .collect()
}

fn nexus_config(l: &Layout) -> Result<NexusConfig, Error> {
    let peers = l
        .keeper_ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    NexusConfig::from_source(&dev_env(&[
        ("SPIKE_SVID_DIR", l.svid("nexus").display().to_string()),
        ("SPIKE_TRUST_ROOT", l.trust_domain.clone()),
        (
            "SPIKE_NEXUS_TLS_PORT",
            format!("127.0.0.1:{}", l.nexus_port),
        ),
        ("SPIKE_NEXUS_KEEPER_PEERS", peers),
        ("SPIKE_NEXUS_SHAMIR_SHARES", SHARES.to_string()),
        ("SPIKE_NEXUS_SHAMIR_THRESHOLD", THRESHOLD.to_string()),
        (
            "SPIKE_NEXUS_BACKEND_STORE",
            if l.ephemeral { "memory" } else { "sqlite" }.to_string(),
        ),
        ("SPIKE_NEXUS_DATA_DIR", l.data_dir().display().to_string()),
        ("SPIKE_NEXUS_RECOVERY_MAX_INTERVAL", "1s".to_string()),
        ("SPIKE_NEXUS_KEEPER_TIMEOUT", "2s".to_string()),
    ]))
    .map_err(|e| Error::Usage(e.to_string()))
}

/// A component that ended: its name and how.
type Done = (String, Result<(), String>);

/// Runs `fut` as a task and reports its end (a panic included) on `done`.
fn spawn_component<F>(name: String, fut: F, done: &mpsc::UnboundedSender<Done>)
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let handle = tokio::spawn(fut);
    let done = done.clone();
    tokio::spawn(async move {
        let result = match handle.await {
            Ok(r) => r,
            Err(e) => Err(format!("task failed: {e}")),
        };
        let _ = done.send((name, result));
    });
}

/// Resolves once `stop` says so (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs the whole dev system until Ctrl-C / SIGTERM or a component fails.
pub async fn run(args: DevArgs) -> Result<(), Error> {
    // Listen for the signal from the very start, so a Ctrl-C during setup stops cleanly too.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    {
        let stop_tx = Arc::clone(&stop_tx);
        tokio::spawn(async move {
            crate::platform::shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
    }

    let l = layout(&args)?;
    warn_dev_mode(&l);
    ensure_pki(&l)?;
    let nexus_svid = load_svid(l.svid("nexus"))?;
    let minted_for = nexus_svid.current().id().trust_domain().to_string();
    if minted_for != l.trust_domain {
        return Err(Error::Usage(format!(
            "{} was set up for trust domain {minted_for}, but SPIKE_TRUST_ROOT is {}: unset SPIKE_TRUST_ROOT or use another --dir",
            l.dir.display(),
            l.trust_domain
        )));
    }
    let keeper_cfgs = keeper_configs(&l)?;
    let nexus_cfg = nexus_config(&l)?;
    let roots = ca_roots(&l)?;
    let as_nexus = KeeperClient::new(client(
        identity::client_config(
            Some(&nexus_svid),
            Some(roots.clone()),
            &l.trust_domain,
            ExpectedPeer::Role(Role::Keeper),
        )
        .map_err(runtime)?,
    ));
    let anonymous = client(
        identity::client_config(
            None,
            Some(roots),
            &l.trust_domain,
            ExpectedPeer::Role(Role::Nexus),
        )
        .map_err(runtime)?,
    );

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut running = 0usize;
    for (i, cfg) in keeper_cfgs.into_iter().enumerate() {
        let stop = stopped(stop_rx.clone());
        spawn_component(
            format!("keeper {}", i + 1),
            async move {
                crate::keeper::run(cfg, stop)
                    .await
                    .map_err(|e| e.to_string())
            },
            &done_tx,
        );
        running += 1;
    }

    let startup = async {
        wait_for_keepers(&l, &as_nexus).await?;
        let explained = prepare_key(&l, &as_nexus, &nexus_cfg.backend).await?;
        let stop = stopped(stop_rx.clone());
        spawn_component(
            "nexus".into(),
            async move {
                crate::nexus::run(nexus_cfg, stop)
                    .await
                    .map_err(|e| e.to_string())
            },
            &done_tx,
        );
        running += 1;
        let key_id = wait_ready(&l, &anonymous, explained).await?;
        save_shards(&l, &as_nexus, &key_id).await?;
        Ok::<String, Error>(key_id)
    };

    let outcome: Result<(), Error> = tokio::select! {
        biased;
        () = stopped(stop_rx.clone()) => Ok(()),
        r = startup => match r {
            Ok(key_id) => {
                print_ready(&l, &key_id);
                tokio::select! {
                    biased;
                    () = stopped(stop_rx.clone()) => Ok(()),
                    Some((name, r)) = done_rx.recv() => {
                        running -= 1;
                        ended(&name, r, &stop_rx)
                    }
                }
            }
            Err(e) => Err(e),
        },
        Some((name, r)) = done_rx.recv() => {
            running -= 1;
            ended(&name, r, &stop_rx)
        }
    };

    // Stop whatever still runs and wait for it, bounded.
    let _ = stop_tx.send(true);
    drop(done_tx);
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + STOP_LIMIT;
    while running > 0 {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some((name, r))) => {
                running -= 1;
                if let Err(e) = r {
                    failures.push(format!("{name}: {e}"));
                }
            }
            Ok(None) => break,
            Err(_) => {
                failures.push(format!(
                    "{running} component(s) did not stop within {}s",
                    STOP_LIMIT.as_secs()
                ));
                break;
            }
        }
    }
    outcome?;
    if let Some(first) = failures.into_iter().next() {
        return Err(Error::Failed(first));
    }
    println!("spike dev: stopped");
    Ok(())
}

/// A component ended: an error, or a clean end that only counts as one if no stop was asked.
fn ended(name: &str, r: Result<(), String>, stop: &watch::Receiver<bool>) -> Result<(), Error> {
    match r {
        Err(e) => Err(Error::Failed(format!("{name}: {e}"))),
        Ok(()) if *stop.borrow() => Ok(()),
        Ok(()) => Err(Error::Failed(format!("{name} stopped unexpectedly"))),
    }
}

fn warn_dev_mode(l: &Layout) {
    if l.ephemeral {
        eprintln!(
            "spike dev: DEVELOPMENT MODE, not for production. Ephemeral: memory store, nothing is kept after exit."
        );
    } else {
        eprintln!(
            "spike dev: DEVELOPMENT MODE, not for production. Root-key shards are kept on disk in {} so a restart keeps your data.",
            l.shards_file().display()
        );
    }
}

/// Waits until every Keeper answers over mTLS (a failure to listen ends its task instead).
async fn wait_for_keepers(l: &Layout, as_nexus: &KeeperClient) -> Result<(), Error> {
    let deadline = Instant::now() + START_LIMIT;
    for i in 0..3 {
        let url = l.keeper_url(i)?;
        loop {
            let position = u8::try_from(i + 1).unwrap_or(u8::MAX);
            if as_nexus.shard(&url, position).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Failed(format!(
                    "keeper {} did not answer on {url} within {}s",
                    i + 1,
                    START_LIMIT.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

/// Before Nexus starts (SQLite only): preload the saved shards, or make a new key and save its
/// shards first, or explain a store whose key has no shards file. Returns whether the user was
/// already told why Nexus will wait for a restore.
async fn prepare_key(
    l: &Layout,
    as_nexus: &KeeperClient,
    backend: &crate::store::Backend,
) -> Result<bool, Error> {
    if l.ephemeral {
        return Ok(false);
    }
    let path = l.shards_file();
    let db = l.data_dir().join("spike.db");
    if path.exists() {
        if db.exists() {
            preload_shards(l, as_nexus).await?;
            return Ok(false);
        }
        // The store is gone: those shards belong to a key nothing uses any more.
        std::fs::remove_file(&path)
            .map_err(|e| runtime(format!("cannot remove {}: {e}", path.display())))?;
        eprintln!(
            "spike dev: {} has no store any more; removed the stale {} and starting a new deployment",
            l.data_dir().display(),
            path.display()
        );
    } else if db.exists() {
        match orphaned_records(backend).await? {
            None => {}
            Some(0) => set_aside(l)?,
            Some(records) => {
                eprintln!(
                    "spike dev: {db} holds a root key and {records} secret or policy record(s), but {file} is missing, so no Keeper can get that key back. \
                     Nothing was changed. Either restore the key: while spike dev keeps running, send threshold ({THRESHOLD}) recovery shards exported earlier \
                     with `SPIKE_SVID_DIR={restore} spike recover restore --nexus {url} FILE` (spike dev then saves {file} again); \
                     or stop spike dev and remove {data} to start over without those records.",
                    db = db.display(),
                    file = path.display(),
                    restore = l.svid("restore").display(),
                    url = l.nexus_url(),
                    data = l.data_dir().display(),
                );
                return Ok(true);
            }
        }
    }
    new_key(l, as_nexus).await?;
    Ok(false)
}

/// If the store holds a root-key verifier: how many records besides it (secrets, policies,
/// other system records). `None` when it holds no verifier, so no key to lose.
async fn orphaned_records(backend: &crate::store::Backend) -> Result<Option<usize>, Error> {
    let cannot = |e: crate::store::Error| runtime(format!("cannot read the dev store: {e}"));
    let store = AnyStore::open(backend).await.map_err(cannot)?;
    if store.verifier().await.map_err(cannot)?.is_none() {
        return Ok(None);
    }
    let mut records = 0;
    for ns in [Namespace::Secrets, Namespace::Policies, Namespace::System] {
        records += store.list(ns, "").await.map_err(cannot)?.len();
    }
    // The verifier itself is one of the system records.
    Ok(Some(records.saturating_sub(1)))
}

/// Moves a store that holds nothing but the verifier of a lost key out of the way.
fn set_aside(l: &Layout) -> Result<(), Error> {
    let data = l.data_dir();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = l.dir.join(format!("data.orphaned-{secs}"));
    std::fs::rename(&data, &aside).map_err(|e| {
        runtime(format!(
            "cannot move {} to {}: {e}",
            data.display(),
            aside.display()
        ))
    })?;
    eprintln!(
        "spike dev: {} held the verifier of a root key whose shards were never saved to {} \
         (an earlier spike dev stopped in between) and no secret or policy; moved it to {} and starting a new deployment",
        data.display(),
        l.shards_file().display(),
        aside.display()
    );
    Ok(())
}

/// The shards file's text: one encoded shard a line, in a buffer reserved up front so it never
/// reallocates (a reallocation would leave a copy of the shards behind, unwiped).
fn shards_text<'a>(shares: impl ExactSizeIterator<Item = &'a Share>) -> Zeroizing<String> {
    let mut text = Zeroizing::new(String::with_capacity(
        shares.len() * (crate::crypto::RECOVERY_SHARD_MAX_LEN + 1),
    ));
    for share in shares {
        text.push_str(&encode_recovery_shard(share));
        text.push('\n');
    }
    text
}

/// A new deployment: makes the root key, writes its shards file, and only then hands the
/// shards to the Keepers. Nexus finds shards and no verifier, adopts the key and records its
/// verifier, so the key never becomes durable in the store before its shards are on disk.
async fn new_key(l: &Layout, as_nexus: &KeeperClient) -> Result<(), Error> {
    let key = RootKey::generate().map_err(runtime)?;
    let shares = crate::crypto::split(&key, THRESHOLD, SHARES).map_err(runtime)?;
    let path = l.shards_file();
    let text = shards_text(shares.iter().take(usize::from(THRESHOLD)));
    write_private(&path, text.as_bytes())?;
    tracing::info!(key_id = %key.key_id(), path = %path.display(), "made a new dev root key and saved its shards (mode 0600) before handing them to the Keepers");
    contribute(l, as_nexus, &shares).await
}

/// Hands each shard to the Keeper of its index.
async fn contribute(l: &Layout, as_nexus: &KeeperClient, shares: &[Share]) -> Result<(), Error> {
    for share in shares {
        let url = l.keeper_url(usize::from(share.index) - 1)?;
        as_nexus.contribute(&url, share).await.map_err(|e| {
            Error::Failed(format!(
                "keeper {} refused the saved shard ({e})",
                share.index
            ))
        })?;
    }
    Ok(())
}

/// On a restart with a SQLite store, hands the saved shards to the Keepers before Nexus starts.
async fn preload_shards(l: &Layout, as_nexus: &KeeperClient) -> Result<(), Error> {
    let path = l.shards_file();
    let text = Zeroizing::new(
        std::fs::read_to_string(&path)
            .map_err(|e| runtime(format!("cannot read {}: {e}", path.display())))?,
    );
    let unusable = |reason: String| {
        Error::Failed(format!(
            "{} is unusable ({reason}); to start over, remove it and {}",
            path.display(),
            l.data_dir().display()
        ))
    };
    let mut shares = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let share = decode_recovery_shard(line).map_err(|e| unusable(e.to_string()))?;
        if !(1..=SHARES).contains(&share.index) {
            return Err(unusable(format!(
                "shard index {} out of range",
                share.index
            )));
        }
        shares.push(share);
    }
    if shares.len() < usize::from(THRESHOLD) {
        return Err(unusable(format!(
            "{} shard(s), {THRESHOLD} needed",
            shares.len()
        )));
    }
    contribute(l, as_nexus, &shares).await?;
    tracing::info!(
        shards = shares.len(),
        "handed the saved dev shards to the Keepers"
    );
    Ok(())
}

/// Polls Nexus's `/health` until it says `ready`, and returns the key id it reports.
async fn wait_ready(l: &Layout, anonymous: &HttpsClient, hinted: bool) -> Result<String, Error> {
    let url: Uri = l.nexus_url().parse().map_err(runtime)?;
    let mut hinted = hinted;
    loop {
        if let Ok(reply) = anonymous.get(&url, "/health").await {
            let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
            match body["status"].as_str() {
                Some("ready") if reply.status == StatusCode::OK => {
                    return Ok(body["key_id"].as_str().unwrap_or("?").to_string());
                }
                Some("awaiting_restore") if !hinted => {
                    hinted = true;
                    eprintln!(
                        "spike dev: the store in {} has a root key but no Keeper holds its shards ({} is missing or stale). \
                         Restore with `spike recover restore` using the {} identity, or stop and remove {} to start over.",
                        l.data_dir().display(),
                        l.shards_file().display(),
                        l.svid("restore").display(),
                        l.data_dir().display()
                    );
                }
                _ => {}
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Once the key exists (SQLite only, and only if not saved yet, i.e. after a restore): reads
/// `threshold` shards back from the Keepers, checks they rebuild the key Nexus reports, and
/// writes the dev shards file.
async fn save_shards(l: &Layout, as_nexus: &KeeperClient, key_id: &str) -> Result<(), Error> {
    let path = l.shards_file();
    if l.ephemeral || path.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + START_LIMIT;
    let shares = loop {
        let mut shares: Vec<Share> = Vec::new();
        for i in 0..3 {
            if shares.len() == usize::from(THRESHOLD) {
                break;
            }
            if let Some(share) = keeper_shard(as_nexus, &l.keeper_url(i)?, i).await {
                shares.push(share);
            }
        }
        if shares.len() == usize::from(THRESHOLD) {
            break shares;
        }
        if Instant::now() > deadline {
            return Err(Error::Failed(format!(
                "the Keepers were not refilled within {}s; cannot save {}",
                START_LIMIT.as_secs(),
                path.display()
            )));
        }
        tokio::time::sleep(POLL).await;
    };
    let key = crate::crypto::combine(&shares).map_err(runtime)?;
    if key.key_id() != key_id {
        return Err(Error::Failed(format!(
            "the Keepers' shards rebuild key {} but Nexus reports {key_id}; not saving them",
            key.key_id()
        )));
    }
    let text = shards_text(shares.iter());
    write_private(&path, text.as_bytes())?;
    tracing::info!(path = %path.display(), "saved the dev root-key shards (mode 0600)");
    Ok(())
}

/// The shard a Keeper holds, if any.
async fn keeper_shard(as_nexus: &KeeperClient, url: &Uri, position: usize) -> Option<Share> {
    match as_nexus.shard(url, u8::try_from(position + 1).ok()?).await {
        Ok(ShardAnswer::Shard(share)) => Some(share),
        _ => None,
    }
}

/// Writes `data` to `path` atomically and durably (file and directory fsynced), mode 0600 from
/// the first byte.
fn write_private(path: &Path, data: &[u8]) -> Result<(), Error> {
    crate::platform::fs::replace(path, data, crate::platform::fs::PRIVATE)
        .map_err(|e| runtime(format!("cannot write {}: {e}", path.display())))
}

fn print_ready(l: &Layout, key_id: &str) {
    let store = if l.ephemeral {
        "memory store (ephemeral)".to_string()
    } else {
        format!("sqlite at {}", l.data_dir().join("spike.db").display())
    };
    let dir = l.dir.display();
    let url = l.nexus_url();
    println!(
        "spike dev: ready (root key {key_id}, 3 keepers, {store})

In another terminal:
  export SPIKE_NEXUS_API_URL={url}
  export SPIKE_SVID_DIR={dir}/superuser
  export SPIKE_TRUST_ROOT={td}
  spike secret put secrets/db/creds username=admin password=s3cret
  spike secret get secrets/db/creds

Health check: curl --cacert {dir}/ca/ca.pem {url}/health
Recover/restore operator identities: {dir}/recover, {dir}/restore
Press Ctrl-C to stop.",
        td = l.trust_domain,
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap freely
mod tests {
    use super::*;

    #[test]
    fn the_shards_text_never_reallocates() {
        let shares: Vec<Share> = (1..=255u8)
            .map(|i| Share::new(i, [1; 32]).unwrap())
            .collect();
        for n in [1, 2, 99, 255] {
            let reserved = n * (crate::crypto::RECOVERY_SHARD_MAX_LEN + 1);
            let text = shards_text(shares.iter().take(n));
            assert_eq!(text.capacity(), reserved, "{n} shards");
            assert_eq!(text.lines().count(), n);
        }
    }
}
