//! `spike recover export DIR` and `spike recover restore --nexus URL FILE` (DESIGN.md §1.5).
//!
//! Export asks Nexus for the recovery shards (recover-role operators only) and writes one file
//! per shard, `DIR/spike.recovery.<i>.txt`, mode 0600, content `spike:<i>:<hex>` (SPIKE's
//! format); it never overwrites a file. Restore validates one shard file before it leaves the
//! machine and sends it to the one Nexus instance named (restore-role operators only), because
//! pending shards live in that instance's memory.

use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use hyper::Uri;

use super::args::RecoverCommand;
use super::run::{Error, Op, Result, connect, nexus_failure, require_role};
use crate::crypto::{Share, decode_recovery_shard, encode_recovery_shard};
use crate::identity::Role;
use crate::platform::fs;
use crate::protocol::nexus::RestoreRequest;

fn file_name(dir: &Path, index: u8) -> PathBuf {
    dir.join(format!("spike.recovery.{index}.txt"))
}

/// Reads a set of recovery files from `dir`: every `spike.recovery.<i>.txt` in it, as our
/// `recover export` and SPIKE's Pilot (`spike operator recover`) write them, each validated
/// like a file given to `recover restore`, and the index in its name checked against the one
/// in its content. At least one file; other files in `dir` are ignored. Errors name the file,
/// never its content.
pub fn read_dir(dir: &Path) -> Result<Vec<Share>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::Usage(format!("cannot read {}: {e}", dir.display())))?;
    let mut shares: Vec<Share> = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| Error::Usage(format!("cannot read {}: {e}", dir.display())))?;
        let name = entry.file_name();
        let Some(named) = name
            .to_str()
            .and_then(|n| n.strip_prefix("spike.recovery."))
            .and_then(|n| n.strip_suffix(".txt"))
        else {
            continue;
        };
        let path = entry.path();
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(&path)
                .map_err(|e| Error::Usage(format!("cannot read {}: {e}", path.display())))?,
        );
        let share = decode_recovery_shard(&text).map_err(|e| {
            Error::Usage(format!(
                "{} is not a valid recovery shard: {e}",
                path.display()
            ))
        })?;
        if named != share.index.to_string() {
            return Err(Error::Usage(format!(
                "{} holds the shard of index {}: a file renamed by hand?",
                path.display(),
                share.index
            )));
        }
        shares.push(share);
    }
    if shares.is_empty() {
        return Err(Error::Usage(format!(
            "{} holds no recovery file (spike.recovery.<i>.txt)",
            dir.display()
        )));
    }
    shares.sort_by_key(|s| s.index);
    Ok(shares)
}

/// Runs one `spike recover` command.
pub async fn run(command: RecoverCommand) -> Result<()> {
    match command {
        RecoverCommand::Export { dir } => export(&dir).await,
        RecoverCommand::Restore { nexus, file } => restore(&nexus, &file).await,
    }
}

async fn export(dir: &Path) -> Result<()> {
    let client = connect().await?;
    require_role(&client, Role::Recover, "recover export")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::Usage(format!("cannot create {}: {e}", dir.display())))?;
    let op = Op {
        permission: "recover",
        resource: "the recovery shards",
        subject: "the root key".into(),
        invalid_hint: "recovery needs a Nexus that has its root key",
        write: false,
    };
    let resp = client
        .recover()
        .await
        .map_err(|e| nexus_failure(&client, &op, e))?;
    let mut shares = Vec::new();
    for (index, value) in &resp.shards {
        let index: u8 = index
            .parse()
            .map_err(|_| Error::Failed(format!("Nexus sent a shard with index {index:?}")))?;
        let share = Share::new(index, *value)
            .map_err(|e| Error::Failed(format!("Nexus sent an invalid shard: {e}")))?;
        shares.push(share);
    }
    if shares.is_empty() {
        return Err(Error::Failed("Nexus sent no recovery shards".into()));
    }
    // Refuse before writing anything if any target exists.
    for s in &shares {
        let path = file_name(dir, s.index);
        if path.exists() {
            return Err(Error::Usage(format!(
                "{} already exists; recovery files are never overwritten (move the old set away first)",
                path.display()
            )));
        }
    }
    for s in &shares {
        let path = file_name(dir, s.index);
        let text = zeroize::Zeroizing::new(encode_recovery_shard(s));
        fs::write_new(&path, text.as_bytes(), fs::PRIVATE)
            .map_err(|e| Error::Failed(format!("cannot write {}: {e}", path.display())))?;
    }
    eprintln!(
        "wrote {} recovery shards to {} (mode 0600). A threshold of them (SPIKE_NEXUS_SHAMIR_THRESHOLD, 2 by default) rebuilds the root key: keep them apart, encrypted and offline.",
        shares.len(),
        dir.display(),
    );
    Ok(())
}

async fn restore(nexus: &str, file: &Path) -> Result<()> {
    let url: Uri = crate::platform::env::parse_https_url(nexus)
        .map_err(|e| Error::Usage(format!("--nexus: {e}")))?;
    let text = if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .take(4096)
            .read_to_string(&mut text)
            .map_err(|e| Error::Usage(format!("cannot read the shard from stdin: {e}")))?;
        zeroize::Zeroizing::new(text)
    } else {
        zeroize::Zeroizing::new(
            std::fs::read_to_string(file)
                .map_err(|e| Error::Usage(format!("cannot read {}: {e}", file.display())))?,
        )
    };
    let share = decode_recovery_shard(&text).map_err(|e| {
        Error::Usage(format!(
            "{} is not a valid recovery shard: {e}",
            file.display()
        ))
    })?;
    let client = connect().await?.with_urls(vec![url.clone()]);
    require_role(&client, Role::Restore, "recover restore")?;
    let op = Op {
        permission: "restore",
        resource: "the root key",
        subject: "the restore".into(),
        invalid_hint: "restore is refused by a Nexus that already has its root key or for an index outside 1..=shares; a set of shards that does not rebuild this deployment's key stays pending: send the right shard for an index again (the newest wins) or shards of other indices",
        write: true,
    };
    let req = RestoreRequest {
        id: u64::from(share.index),
        shard: Some(*share.value()),
    };
    let resp = client
        .restore(&req)
        .await
        .map_err(|e| nexus_failure(&client, &op, e))?;
    if resp.restored {
        eprintln!(
            "restored: Nexus at {url} has its root key again and is refilling the Keepers; other instances will recover from them"
        );
    } else {
        eprintln!(
            "shard {} accepted by {url}: {} collected, {} more needed",
            share.index, resp.collected, resp.remaining
        );
    }
    Ok(())
}
