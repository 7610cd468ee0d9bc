//! `spike operator rotate|reencrypt|retire`: the keyring's data keys through Nexus (superuser
//! only; decision 33). Each prints the keyring — which key is current and every key's state.

use super::args::{Format, OperatorCommand};
use super::run::{Error, Op, Result, connect, nexus_failure, print_json, stdout};
use crate::identity::Role;
use crate::protocol::nexus::RotateResponse;

/// Runs one `spike operator` verb.
pub async fn run(format: Format, command: OperatorCommand) -> Result<()> {
    let client = connect().await?;
    let td = client.caller().trust_domain().to_string();
    if Role::of(client.caller(), &td) != Some(Role::Superuser) {
        return Err(Error::Usage(format!(
            "spike operator needs an operator SVID with the superuser role \
             (spiffe://{td}/spike/pilot/role/superuser); SPIKE_SVID_DIR names {}",
            client.caller()
        )));
    }
    let (permission, note) = match command {
        OperatorCommand::Rotate { reencrypt: true } => (
            "rotate",
            "re-encryption started: Nexus logs its progress and its end\n",
        ),
        OperatorCommand::Rotate { reencrypt: false } => ("rotate", ""),
        OperatorCommand::Reencrypt => (
            "reencrypt",
            "re-encryption started: Nexus logs its progress and its end\n",
        ),
        OperatorCommand::Retire { .. } => ("retire", ""),
    };
    let op = Op {
        permission,
        resource: "the keyring",
        subject: "the keyring".into(),
        invalid_hint: match command {
            OperatorCommand::Retire { .. } => {
                "a key in use is not retired: the current key (rotate first), or one that records \
                 still name (run spike operator reencrypt and wait for its end in the Nexus log)"
            }
            _ => "key operations need a Nexus of this version with its root key loaded",
        },
        write: true,
    };
    let resp = match command {
        OperatorCommand::Rotate { reencrypt } => client.rotate(reencrypt).await,
        OperatorCommand::Reencrypt => client.reencrypt().await,
        OperatorCommand::Retire { id } => client.retire(id).await,
    }
    .map_err(|e| nexus_failure(&client, &op, e))?;
    print(format, &resp, note)
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
