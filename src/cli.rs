//! Command-line definitions for every `spike` subcommand (clap derive). The forms listed in
//! DESIGN.md §7 are a contract with operators' scripts: flags may be added, never renamed.

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
    /// Development and test PKI: a trust-domain CA and SVIDs for every role.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
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
