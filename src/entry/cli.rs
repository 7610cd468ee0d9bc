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
/// The `spike` command line.
pub struct Cli {
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Every subcommand.
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
        /// The verb.
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Manage the policies that grant workloads access to secret paths.
    Policy {
        /// Output format: text for people, json for scripts (data on stdout either way).
        #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// The verb.
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Encrypt or decrypt data with a key derived from the root key, without storing it.
    Cipher {
        /// text: binary stream mode; json: SPIKE's JSON mode (base64 fields).
        #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// The verb.
        #[command(subcommand)]
        command: CipherCommand,
    },
    /// Recovery shards: export them while healthy, restore from them when every Keeper is lost.
    Recover {
        /// The verb.
        #[command(subcommand)]
        command: RecoverCommand,
    },
    /// Key operations on a running deployment: rotate the data key.
    Operator {
        /// `text` or `json` (the answer object on one line).
        #[arg(long, value_enum, default_value_t = Format::Text, global = true)]
        format: Format,
        /// The verb.
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// The audit trail: check Nexus audit files offline with recovery shards.
    Audit {
        /// The verb.
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Development and test PKI: a trust-domain CA and SVIDs for every role.
    Pki {
        /// The verb.
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Backups of the store, authenticated under the root key: take one while Nexus serves,
    /// check one, restore one into an empty store of any backend. Runs with a Nexus's settings
    /// (store, identity, Keepers) or recovery shards.
    Backup {
        /// The verb.
        #[command(subcommand)]
        command: BackupCommand,
    },
    /// Bring the secrets and policies of another secrets store into this deployment's store.
    Migrate {
        /// The source.
        #[command(subcommand)]
        command: MigrateCommand,
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

/// `spike pki` verbs.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a trust-domain CA: DIR/ca.pem and DIR/ca.key (mode 0600).
    Init {
        /// Directory for the CA files (created if missing).
        dir: PathBuf,
        /// The SPIFFE trust domain the CA signs for.
        #[arg(long, default_value = crate::identity::DEFAULT_TRUST_DOMAIN)]
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

/// `spike backup` verbs.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Write a consistent snapshot of the store, sealed as stored (no value is ever opened)
    /// and authenticated by a MAC under the root key, to a file (mode 0600, written under a
    /// temporary name and renamed). Safe while Nexus serves. Prints the file's path.
    #[command(long_about = CREATE_ABOUT)]
    #[command(group(clap::ArgGroup::new("to").required(true).args(["out", "dir"])))]
    Create {
        /// The backup file; an existing one is replaced only with --force.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Write DIR/spike-backup-<UTC time>.jsonl instead (DIR created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// With --dir: keep only the newest N backups in DIR, this one included.
        #[arg(long, value_name = "N", requires = "dir")]
        keep: Option<usize>,
        /// With --out: replace an existing file.
        #[arg(long, requires = "out")]
        force: bool,
        /// Rebuild the root key from the recovery shard files (spike.recovery.<i>.txt, at
        /// least the threshold) in DIR instead of asking the Keepers.
        #[arg(long, value_name = "DIR")]
        recover_dir: Option<PathBuf>,
    },
    /// Check a backup with the root key: its MAC, then that the key opens its verifier, every
    /// secret record and the policy book. Writes nothing.
    #[command(long_about = VERIFY_ABOUT)]
    Verify {
        /// The backup file.
        file: PathBuf,
        /// Rebuild the root key from the recovery shard files (spike.recovery.<i>.txt, at
        /// least the threshold) in DIR instead of asking the Keepers.
        #[arg(long, value_name = "DIR", conflicts_with = "structure_only")]
        recover_dir: Option<PathBuf>,
        /// Check the structure only, without the root key: complete, well-formed, undamaged.
        /// Proves nothing against tampering.
        #[arg(long)]
        structure_only: bool,
        /// Accept a backup of format version 1, which has no MAC (a warning is logged).
        #[arg(long)]
        accept_unauthenticated: bool,
    },
    /// Load a backup into an empty store of any backend (the one SPIKE_NEXUS_BACKEND_STORE
    /// names), after checking all of it, MAC included, with the root key.
    #[command(long_about = RESTORE_ABOUT)]
    Restore {
        /// The backup file.
        file: PathBuf,
        /// Rebuild the backup's root key from the recovery shard files (spike.recovery.<i>.txt,
        /// at least the threshold) in DIR instead of asking the Keepers.
        #[arg(long, value_name = "DIR")]
        recover_dir: Option<PathBuf>,
        /// Accept a backup of format version 1, which has no MAC (a warning is logged).
        #[arg(long)]
        accept_unauthenticated: bool,
    },
}

const CREATE_ABOUT: &str = "Write a consistent snapshot of the store, sealed as stored (no value is ever opened), to a file (mode 0600, written under a temporary name and renamed). Safe while Nexus serves. Prints the file's path.

Run it with the environment of one of the deployment's Nexus instances (/etc/spike/nexus.env): the store settings, and the Nexus identity (SVID files or SPIFFE_ENDPOINT_SOCKET) with SPIKE_NEXUS_KEEPER_PEERS and SPIKE_NEXUS_SHAMIR_THRESHOLD. It asks the Keepers for their shards as a Nexus does and accepts the root key only if it opens the store's verifier; with --recover-dir it rebuilds the key from recovery shards instead. The key stays in this process, in locked memory, and authenticates the file: a MAC under a key derived from it covers the header and every record, in order, so no one without the root key can change, drop, add, reorder or splice records unnoticed. Without the key, nothing is written.";

const VERIFY_ABOUT: &str = "Check a backup with the root key: its MAC (nothing changed since it was made by a holder of the root key), then that the key opens its verifier, every secret record and the policy book. Writes nothing.

The root key comes from the Keepers, asked with a Nexus's identity and settings (SPIKE_NEXUS_KEEPER_PEERS, SPIKE_NEXUS_SHAMIR_THRESHOLD, its SVID), which must hold the key the backup was made under; or from recovery shards (--recover-dir). A backup made under another root key (another deployment, or before a rekey) is named as such. --structure-only checks without any key that the file is complete, well-formed and undamaged, and says that this proves nothing against tampering.

A backup of format version 1 (written before backups carried a MAC) is refused unless --accept-unauthenticated is given.";

const RESTORE_ABOUT: &str = "Load a backup into an empty store of any backend (the one SPIKE_NEXUS_BACKEND_STORE names). Nothing is written unless the whole file is complete and its MAC verifies under the backup's root key, and that key opens its verifier, every secret record and the policy book. A failure part-way leaves a marker that keeps every Nexus off the store until the same restore is run again and finishes.

The backup's root key comes from its recovery shards (--recover-dir: the disaster case, when the store and the Keepers are gone), or from the Keepers if they still hold it (asked with a Nexus's identity and settings, as verify does). A backup of format version 1 (no MAC) is refused unless --accept-unauthenticated is given.";

/// `spike migrate` sources.
#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Copy every secret (all versions, deleted markers, times) and policy of a SPIKE Nexus
    /// SQLite store into this deployment's store. Runs with a Nexus's environment (store
    /// settings, Nexus SVID, Keeper peers); safe while Nexus instances serve; a rerun writes
    /// nothing.
    #[command(long_about = FROM_SPIKE_ABOUT)]
    FromSpike(FromSpikeArgs),
}

const FROM_SPIKE_ABOUT: &str = "Copy every secret (all versions, deleted markers, times) and policy of a SPIKE Nexus SQLite store into this deployment's store.

Run it with the environment of one of this deployment's Nexus instances: the same SPIKE_NEXUS_BACKEND_STORE and store settings, the same Nexus SVID, the same SPIKE_NEXUS_KEEPER_PEERS. It gets this deployment's root key from its Keepers as a Nexus does (a new deployment without a key: start a Nexus first). The SPIKE store's key comes from its Pilot recovery files (--recover-dir) or its Keepers (--keepers).

Nothing is written unless the whole SPIKE store opens under that key and passes spike's rules, and no secret path or policy name already exists in the target with other content; those that exist with the same content are skipped, so a rerun changes nothing. Writes are conditional, so Nexus instances may serve meanwhile. A store failure while writing leaves part of the secrets written: run the command again to complete it.";

/// `spike migrate from-spike` options.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source_key").required(true).args(["recover_dir", "keepers"])))]
pub struct FromSpikeArgs {
    /// The SPIKE Nexus SQLite file (its `spike.db`; stop that Nexus first).
    pub db: PathBuf,
    /// A directory holding SPIKE Pilot recovery files `spike.recovery.<i>.txt` (a threshold
    /// of them or more).
    #[arg(long)]
    pub recover_dir: Option<PathBuf>,
    /// The SPIKE deployment's Keeper URLs, comma-separated, all of them in the order of its
    /// SPIKE_NEXUS_KEEPER_PEERS (a SPIKE Keeper does not know its shard's index: position i
    /// is index i).
    #[arg(long, value_delimiter = ',')]
    pub keepers: Vec<String>,
    /// Read and check everything, compare with the target, say what would be written; write
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl FromSpikeArgs {
    /// The request for [`crate::migrate::from_spike`].
    pub fn request(self) -> crate::migrate::FromSpike {
        crate::migrate::FromSpike {
            db: self.db,
            key: match self.recover_dir {
                Some(dir) => crate::migrate::SourceKey::RecoverDir(dir),
                None => crate::migrate::SourceKey::Keepers(self.keepers),
            },
            dry_run: self.dry_run,
        }
    }
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

pub use crate::client::args::{
    AuditCommand, CipherCommand, CipherIo, Format, OperatorCommand, PolicyCommand, RecoverCommand,
    SecretCommand,
};

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_forms_of_design_section_7() {
        Cli::command().debug_assert();
        let parse = |args: &[&str]| Cli::try_parse_from([&["spike"], args].concat());
        let cli = parse(&[
            "secret",
            "get",
            "a/b",
            "k",
            "--version",
            "3",
            "--format",
            "json",
        ])
        .unwrap();
        let Command::Secret { format, command } = cli.command else {
            panic!("secret")
        };
        assert_eq!(format, Format::Json);
        assert!(matches!(
            command,
            SecretCommand::Get { path, key: Some(key), version: Some(3) } if path == "a/b" && key == "k"
        ));
        let cli = parse(&["secret", "delete", "a", "--versions", "2,1"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Secret { command: SecretCommand::Delete { versions: Some(v), .. }, .. }
                if v.0 == [1, 2]
        ));
        let cli = parse(&[
            "policy",
            "create",
            "--name",
            "n",
            "--spiffeid-pattern",
            "s",
            "--path-pattern",
            "p",
            "--permissions",
            "read,write,list",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Policy { format: Format::Text, command: PolicyCommand::Create { permissions, .. } }
                if permissions == ["read", "write", "list"]
        ));
        let cli = parse(&["cipher", "decrypt", "--in", "a", "--out", "b"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Cipher { command: CipherCommand::Decrypt(io), .. }
                if io.input.is_some() && io.out.is_some()
        ));
        for bad in [
            &["secret", "put", "p"][..],
            &["secret", "delete", "p", "--versions", "x"],
            &["policy", "create", "--name", "n"],
            &["cipher", "rot13"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
        assert_eq!(
            parse(&["--version"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayVersion,
            "spike --version still works"
        );
    }
}
