//! `spike operator rotate|reencrypt|retire|rekey`: the keyring's data keys and the root key
//! through Nexus (superuser only; decisions 33 and 34). The key verbs print the keyring — which
//! key is current and every key's state; rekey prints the new root key and its sharing.

use super::args::{Format, OperatorCommand};
use super::run::{Error, Op, Result, connect, nexus_failure, print_json, require_role, stdout};
use crate::identity::Role;
use crate::protocol::nexus::{RekeyRequest, RekeyResponse, RotateResponse};

/// Runs one `spike operator` verb.
pub async fn run(format: Format, command: OperatorCommand) -> Result<()> {
    let client = connect().await?;
    require_role(&client, Role::Superuser, "spike operator")?;
    const STARTED: &str = "re-encryption started: Nexus logs its progress and its end\n";
    let (permission, note, resp) = match command {
        OperatorCommand::Rekey { threshold, keepers } => {
            return rekey(&client, format, RekeyRequest { threshold, keepers }).await;
        }
        OperatorCommand::Rotate { reencrypt } => (
            "rotate",
            if reencrypt { STARTED } else { "" },
            client.rotate(reencrypt).await,
        ),
        OperatorCommand::Reencrypt => ("reencrypt", STARTED, client.reencrypt().await),
        OperatorCommand::Retire { id } => ("retire", "", client.retire(id).await),
    };
    let op = Op {
        permission,
        resource: "the keyring",
        subject: "the keyring".into(),
        invalid_hint: if permission == "retire" {
            "a key in use is not retired: the current key (rotate first), or one that records \
             still name (run spike operator reencrypt and wait for its end in the Nexus log)"
        } else {
            "key operations need a Nexus of this version with its root key loaded"
        },
        write: true,
    };
    let resp = resp.map_err(|e| nexus_failure(&client, &op, e))?;
    print(format, &resp, note)
}

/// `spike operator rekey`: the sharing is checked here with the rule Nexus applies, so a typo
/// is caught before anything is sent.
async fn rekey(
    client: &crate::client::nexus::NexusClient,
    format: Format,
    req: RekeyRequest,
) -> Result<()> {
    if let Some(keepers) = &req.keepers {
        for k in keepers {
            crate::platform::env::parse_https_url(k.trim())
                .map_err(|e| Error::Usage(format!("--keepers: {e}")))?;
        }
    }
    if req.threshold.is_some() || req.keepers.is_some() {
        // Left out: Nexus keeps the current value, which only it knows; checked there.
        if let (Some(t), Some(k)) = (req.threshold, &req.keepers) {
            crate::protocol::nexus::check_sharing(t, k.len())
                .map_err(|e| Error::Usage(format!("the new sharing is refused: {e}")))?;
        }
    }
    let op = Op {
        permission: "rekey",
        resource: "the root key",
        subject: "the root key".into(),
        invalid_hint: "the new sharing is refused: the threshold must be between 1 and the \
                       number of Keepers, each an https URL listed once",
        write: true,
    };
    let resp = client
        .rekey(&req)
        .await
        .map_err(|e| nexus_failure(client, &op, e))?;
    print_rekey(format, &resp)
}

fn print_rekey(format: Format, resp: &RekeyResponse) -> Result<()> {
    match format {
        Format::Json => print_json(resp),
        Format::Text => {
            let mut text = format!(
                "root key {} replaced by {}: {} of {} Keepers rebuild it ({})\n",
                resp.previous_key_id,
                resp.key_id,
                resp.threshold,
                resp.keepers.len(),
                resp.keepers.join(", ")
            );
            if !resp.unconfirmed.is_empty() {
                text.push_str(&format!(
                    "not confirmed yet (refilled by every Nexus instance): {}\n",
                    resp.unconfirmed.join(", ")
                ));
            }
            text.push_str(
                "recovery shards exported before now restore nothing: run spike recover export \
                 now and store the new files\n",
            );
            stdout(text.as_bytes())
        }
    }
}

fn print(format: Format, resp: &RotateResponse, note: &str) -> Result<()> {
    match format {
        Format::Json => print_json(resp),
        Format::Text => {
            let mut text = format!(
                "data key {} is current: new values are sealed under it on every instance\n",
                resp.current_key
            );
            for k in &resp.keys {
                let legacy = if k.id == 0 {
                    " (legacy: derived from the root key)"
                } else {
                    ""
                };
                text.push_str(&format!("key {}\t{}{legacy}\n", k.id, k.state));
            }
            text.push_str(note);
            stdout(text.as_bytes())
        }
    }
}
