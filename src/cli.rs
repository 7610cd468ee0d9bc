//! Command-line definitions for every `spike` subcommand (clap derive). The forms listed in
//! DESIGN.md §7 are a contract with operators' scripts: flags may be added, never renamed.
//! The shell completions ([`completions`]) and the man pages in `man/`
//! (`cargo run --example manpages`) are generated from these definitions.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "spike",
    version,
    about = "SPIFFE-native secrets manager: Nexus, Keepers, recovery shards and the client",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the secrets API server (configured by SPIKE_* environment variables).
    Nexus,
    /// Run a Keeper, which holds one shard of the root key in memory.
    Keeper,
    /// Run a complete local system in one process: dev PKI, 3 Keepers, 1 Nexus on 127.0.0.1.
    #[command(long_about = DEV_ABOUT)]
    Dev(DevArgs),
    /// Read and write secrets on Nexus (SPIKE_NEXUS_API_URL, SPIKE_SVID_DIR).
    Secret {
        /// Output format: text for people, json for scripts (data on stdout either way).
        #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Manage the policies that grant workloads access to secret paths.
    Policy {
        /// Output format: text for people, json for scripts (data on stdout either way).
        #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Encrypt or decrypt data with a key derived from the root key, without storing it.
    Cipher {
        /// text: binary stream mode; json: SPIKE's JSON mode (base64 fields).
        #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[command(subcommand)]
        command: CipherCommand,
    },
    /// Recovery shards: export them while healthy, restore from them when every Keeper is lost.
    Recover {
        #[command(subcommand)]
        command: RecoverCommand,
    },
    /// Development and test PKI: a trust-domain CA and SVIDs for every role.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Print a shell completion script, e.g. `spike completions bash > /etc/bash_completion.d/spike`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The completion script for `shell` (`spike completions SHELL`). Built in memory because
/// clap_complete panics on a failed write; the caller reports a closed stdout as an error.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "spike", &mut script);
    script
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a trust-domain CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        /// Directory for the CA files (created if missing).
        dir: PathBuf,
        /// The SPIFFE trust domain the CA signs for.
        #[arg(long, default_value = crate::config::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue an X.509 SVID signed by the CA in DIR: OUTDIR/svid.pem, svid_key.pem, svid_bundle.pem.
    Issue {
        /// Directory holding ca.pem and ca.key.
        dir: PathBuf,
        /// The SPIFFE ID to put in the certificate's URI SAN.
        #[arg(long)]
        spiffe_id: String,
        /// Output directory (created if missing; files replaced atomically).
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS name SAN (repeatable), for clients that check host names.
        #[arg(long)]
        dns: Vec<String>,
        /// Extra IP address SAN (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
    },
}

const DEV_ABOUT: &str =
    "Run a complete local system in one process: a dev PKI, 3 Keepers and 1 Nexus \
on 127.0.0.1 (the same code as `spike keeper` and `spike nexus`), then print the exports a client \
needs. Ctrl-C or SIGTERM stops everything (exit 0); a component that cannot start (a port in use) \
stops it all with a one-line reason (exit 1).

Files under DIR: ca/ (the dev CA), nexus/, keeper-1..3/ (server SVIDs), superuser/, recover/, \
restore/ (operator SVIDs), data/spike.db (SQLite store).

DEVELOPMENT ONLY. The Keepers live in this process, so their shards vanish when it exits. To come \
back with the same data, `spike dev` keeps 2 of the 3 Keeper shards (the threshold, i.e. enough to \
rebuild the root key) in DIR/dev-root-key-shards, mode 0600, in SPIKE's recovery text format, and \
hands them to the Keepers on the next start. Never use this for production. With --ephemeral the \
store is in memory and nothing secret is written to disk.";

/// `spike dev` options.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Directory for the dev CA, SVIDs, SQLite store and shards file (created if missing).
    #[arg(long, default_value = ".spike-dev")]
    pub dir: PathBuf,
    /// Use the in-memory store: nothing survives exit, no shards file is written.
    #[arg(long)]
    pub ephemeral: bool,
    /// Nexus port on 127.0.0.1.
    #[arg(long, default_value_t = 8553, value_parser = clap::value_parser!(u16).range(1..))]
    pub nexus_port: u16,
    /// The three Keeper ports on 127.0.0.1, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8443,8543,8643",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub keeper_ports: Vec<u16>,
}

/// Output format of the client commands (`secret`, `policy`, `cipher`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

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
        #[arg(long, value_parser = crate::commands::secret::parse_versions)]
        versions: Option<crate::commands::secret::VersionList>,
    },
    /// Restore soft-deleted versions of PATH (default: the current or latest deleted one).
    Undelete {
        /// Secret path, e.g. secrets/db.
        path: String,
        /// Comma-separated versions, e.g. 1,2.
        #[arg(long, value_parser = crate::commands::secret::parse_versions)]
        versions: Option<crate::commands::secret::VersionList>,
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

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create or replace a policy. Patterns are regular expressions that match anywhere in
    /// the SPIFFE ID or path unless anchored with ^...$.
    Create {
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
        #[arg(long, value_name = "F")]
        file: PathBuf,
    },
    /// List policies (optionally only those whose pattern equals the one given).
    List {
        #[arg(long, value_name = "RE")]
        spiffeid_pattern: Option<String>,
        #[arg(long, value_name = "RE")]
        path_pattern: Option<String>,
    },
    /// Print one policy.
    Get { name: String },
    /// Delete one policy.
    Delete { name: String },
}

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
