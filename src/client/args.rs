//! The arguments of the client verbs (`spike secret`, `policy`, `cipher`, `recover`), owned by the
//! client so that the verbs never reach up into the entry part; `entry::cli` embeds them.

use std::path::PathBuf;

use clap::Subcommand;

/// Output format of the client commands (`secret`, `policy`, `cipher`): `text` for people,
/// `json` for scripts (for `cipher`: the binary stream, or SPIKE's JSON mode).
// clap would turn variant docs into per-value help that reads wrong for `cipher`.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// `spike secret` verbs.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Write a new version of PATH holding the given KEY=VALUE pairs.
    Put {
        /// Secret path, e.g. secrets/db.
        path: String,
        /// KEY=VALUE pairs; split at the first '=', so values may contain '='.
        #[arg(value_name = "KEY=VALUE", required = true)]
        values: Vec<String>,
        /// Check-and-set: write only if N is the current version (0: only if PATH is new).
        #[arg(long, value_name = "N")]
        cas: Option<u64>,
    },
    /// Print a version of PATH (KEY=VALUE lines), or only the value of KEY.
    #[command(disable_version_flag = true)]
    Get {
        /// Secret path, e.g. secrets/db.
        path: String,
        /// Print only this key's value, as is.
        key: Option<String>,
        /// Version to read (default: the current one).
        #[arg(long, value_name = "N")]
        version: Option<u64>,
    },
    /// Print the secret paths you may list, one per line.
    List {
        /// Only paths starting with PREFIX.
        prefix: Option<String>,
    },
    /// Soft-delete versions of PATH (default: the current one); undelete restores them.
    Delete {
        /// Secret path, e.g. secrets/db.
        path: String,
        /// Comma-separated versions, e.g. 1,2.
        #[arg(long, value_parser = super::secret::parse_versions)]
        versions: Option<super::secret::VersionList>,
    },
    /// Restore soft-deleted versions of PATH (default: the current or latest deleted one).
    Undelete {
        /// Secret path, e.g. secrets/db.
        path: String,
        /// Comma-separated versions, e.g. 1,2.
        #[arg(long, value_parser = super::secret::parse_versions)]
        versions: Option<super::secret::VersionList>,
    },
    /// Print the versions of PATH with their times, and the current and oldest version.
    #[command(disable_version_flag = true)]
    Metadata {
        /// Secret path, e.g. secrets/db.
        path: String,
        /// Version to ask about (default: the current one).
        #[arg(long, value_name = "N")]
        version: Option<u64>,
    },
}

/// `spike policy` verbs.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create or replace a policy. Patterns are regular expressions that match anywhere in
    /// the SPIFFE ID or path unless anchored with ^...$.
    Create {
        /// The policy's name (letters, digits, '-', '_' and spaces).
        #[arg(long)]
        name: String,
        /// Regular expression over callers' SPIFFE IDs, e.g. '^spiffe://spike.ist/app/web$'.
        #[arg(long, value_name = "RE")]
        spiffeid_pattern: String,
        /// Regular expression over secret paths, e.g. '^secrets/web/.*$'.
        #[arg(long, value_name = "RE")]
        path_pattern: String,
        /// Comma-separated, from read, write, list, execute, super.
        #[arg(long, value_delimiter = ',', required = true)]
        permissions: Vec<String>,
    },
    /// Create or replace the policy described in a YAML or JSON file
    /// ({name, spiffeidPattern, pathPattern, permissions: [...]}).
    Apply {
        /// The policy file.
        #[arg(long, value_name = "F")]
        file: PathBuf,
    },
    /// List policies (optionally only those whose pattern equals the one given).
    List {
        /// Only policies whose SPIFFE-ID pattern is exactly this.
        #[arg(long, value_name = "RE")]
        spiffeid_pattern: Option<String>,
        /// Only policies whose path pattern is exactly this.
        #[arg(long, value_name = "RE")]
        path_pattern: Option<String>,
    },
    /// Print one policy.
    Get {
        /// The policy's name.
        name: String,
    },
    /// Delete one policy.
    Delete {
        /// The policy's name.
        name: String,
    },
}

/// `spike cipher` verbs.
#[derive(Debug, Subcommand)]
pub enum CipherCommand {
    /// Encrypt bytes (stdin or --in) to a ciphertext (stdout or --out).
    Encrypt(CipherIo),
    /// Decrypt a ciphertext made by `spike cipher encrypt` back to the original bytes.
    Decrypt(CipherIo),
}

/// Where `spike cipher` reads and writes; `-` or nothing means stdin / stdout.
#[derive(Debug, clap::Args)]
pub struct CipherIo {
    /// Input file (default: stdin).
    #[arg(long = "in", short = 'f', visible_alias = "file", value_name = "F")]
    pub input: Option<PathBuf>,
    /// Output file, created with mode 0600 (default: stdout).
    #[arg(long, short = 'o', value_name = "F")]
    pub out: Option<PathBuf>,
}

/// `spike recover` verbs.
#[derive(Debug, Subcommand)]
pub enum RecoverCommand {
    /// Write the recovery shards to DIR/spike.recovery.N.txt (0600, never overwritten).
    /// Needs an operator SVID with the recover role.
    Export {
        /// Directory for the shard files (created 0700 if missing).
        dir: PathBuf,
    },
    /// Send one recovery shard to one Nexus instance that reports awaiting_restore.
    /// Run once per shard, up to the threshold, against the same instance. Needs an operator
    /// SVID with the restore role.
    Restore {
        /// The one Nexus instance to restore (pending shards live in its memory).
        #[arg(long)]
        nexus: String,
        /// A spike.recovery.N.txt file, or - for standard input.
        file: PathBuf,
    },
}

/// `spike operator` verbs.
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Add a data key to the keyring: from now on every Nexus instance seals new values under
    /// it; values sealed under older keys stay readable. Prints the keyring. Needs an operator
    /// SVID with the superuser role.
    Rotate {
        /// Then rewrite every record under an older data key, in the background (Nexus logs
        /// the progress and the end).
        #[arg(long)]
        reencrypt: bool,
    },
    /// Start (or resume) rewriting every record under an older data key with the current one,
    /// in the background. Superuser role.
    Reencrypt,
    /// Mark data key ID retired; refused while any record in the store still names it.
    /// Superuser role.
    Retire {
        /// The data key's id, as `spike operator rotate` lists it.
        id: u32,
    },
    /// Replace the root key: a new one is made, the keyring re-wrapped under it and its shards
    /// sent to the Keepers (and confirmed held) while every Nexus instance keeps serving.
    /// Recovery shards exported before it no longer restore anything: export new ones at once
    /// (spike recover export). Superuser role.
    Rekey {
        /// The new threshold (default: the current one).
        #[arg(long)]
        threshold: Option<u8>,
        /// The new Keepers, comma-separated HTTPS URLs in Shamir index order (default: the
        /// current ones). Change SPIKE_NEXUS_KEEPER_PEERS and SPIKE_NEXUS_SHAMIR_* on every
        /// instance to match afterwards, one at a time; until then the store's record is used.
        #[arg(long, value_name = "URLS", value_delimiter = ',')]
        keepers: Option<Vec<String>>,
    },
}

/// `spike audit` verbs.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check that audit files are complete and unchanged: every record chained to the one
    /// before and authenticated with the deployment's audit key (rebuilt from recovery shards).
    Verify {
        /// A directory of recovery shard files (spike.recovery.<i>.txt), at least the threshold.
        /// Give it once per root key the files span: a trail that crosses a rekey has records
        /// under the old key and the new one.
        #[arg(long, value_name = "DIR", required = true)]
        recover_dir: Vec<PathBuf>,
        /// Audit files, oldest first.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}
