//! `spike audit verify --recover-dir DIR FILE...`: checks Nexus audit files offline.
//!
//! The audit key is derived from the root key, so checking needs the root key: it is rebuilt
//! here, in this process, from a threshold of recovery shards (the files `spike recover
//! export` or SPIKE's Pilot wrote), and never sent anywhere. Whoever holds that many recovery
//! shards can read every secret with a copy of the store anyway, so this asks nothing of an
//! auditor that restoring would not; and no online identity can make a trail look intact.
//!
//! Files are checked in the order given (oldest first, e.g. `audit.jsonl.2 audit.jsonl.1
//! audit.jsonl`): each continues the chain of the one before. The first broken record is
//! reported with its file and line, and the command exits 1.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use super::args::AuditCommand;
use super::run::{Error, Result};
use crate::crypto::shamir;
use crate::protocol::audit::{self, Broken, Kind, Verifier};

/// Runs one `spike audit` command.
pub fn run(command: AuditCommand) -> Result<()> {
    match command {
        AuditCommand::Verify { recover_dir, files } => verify(&recover_dir, &files),
    }
}

/// The audit key and root key id the recovery shards in `dir` rebuild.
fn audit_key(dir: &Path) -> Result<(crate::crypto::MacKey, String)> {
    let shares = super::recover::read_dir(dir)?;
    let root = shamir::combine(&shares).map_err(|e| {
        Error::Usage(format!(
            "the recovery shards in {} do not combine: {e}",
            dir.display()
        ))
    })?;
    Ok((root.derive_mac(audit::KEY_LABEL), root.key_id()))
}

fn verify(recover_dirs: &[PathBuf], files: &[PathBuf]) -> Result<()> {
    let keys = recover_dirs
        .iter()
        .map(|d| audit_key(d))
        .collect::<Result<Vec<_>>>()?;
    let Some(((first_key, first_id), rest)) = keys.split_first() else {
        return Err(Error::Usage("give --recover-dir at least once".into()));
    };
    let mut verifier = rest.iter().fold(
        Verifier::new(first_key, first_id.clone()),
        |v, (key, id)| v.also(key, id.clone()),
    );
    let mut restarts = 0u64;
    let mut first = None;
    for file in files {
        let reader = std::fs::File::open(file)
            .map(std::io::BufReader::new)
            .map_err(|e| Error::Usage(format!("cannot read {}: {e}", file.display())))?;
        for (n, line) in reader.lines().enumerate() {
            let at = format!("{}:{}", file.display(), n + 1);
            let line = line.map_err(|e| Error::Failed(format!("{at}: cannot read: {e}")))?;
            match verifier.check(&line) {
                Ok(record) => {
                    if first.is_none() {
                        first = Some(record.clone());
                    }
                    if record.kind == Kind::Open && record.prev == audit::hex(&audit::GENESIS) {
                        restarts += 1;
                    }
                }
                Err(broken) => return Err(Error::Failed(describe(&at, &line, &broken))),
            }
        }
    }
    println!(
        "{} records verified in {} file(s): the chain is unbroken and every MAC matches ({} written before the root key was loaded, {} trail start(s))",
        verifier.verified,
        files.len(),
        verifier.unauthenticated,
        restarts,
    );
    if let Some(first) = &first
        && first.prev != audit::hex(&audit::GENESIS)
    {
        eprintln!(
            "note: the first record (seq {}) continues a trail whose earlier records are in files not given",
            first.seq
        );
    }
    if verifier.pending > 0 {
        eprintln!(
            "note: the last {} record(s) have no MAC (written as Nexus started, before the root key was loaded) and no later record vouches for them",
            verifier.pending
        );
    }
    Ok(())
}

/// The message for the first broken record: where, which record, what is wrong. The record's
/// own text is not repeated (it is the auditor's file, but it may be long or binary).
fn describe(at: &str, line: &str, broken: &Broken) -> String {
    let seq = audit::parse(line)
        .map(|p| format!(" (seq {})", p.record.seq))
        .unwrap_or_default();
    format!("{at}{seq}: the first broken record: {broken}")
}
