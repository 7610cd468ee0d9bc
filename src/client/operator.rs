//! `spike operator rotate`: adds a data key to the keyring through Nexus (superuser only;
//! decision 33), then prints the keyring — which key is current and every key's state.

use super::args::{Format, OperatorCommand};
use super::run::{Error, Op, Result, connect, nexus_failure, print_json, stdout};
use crate::identity::Role;

/// Runs one `spike operator` verb.
pub async fn run(format: Format, command: OperatorCommand) -> Result<()> {
    match command {
        OperatorCommand::Rotate => rotate(format).await,
    }
}

async fn rotate(format: Format) -> Result<()> {
    let client = connect().await?;
    let td = client.caller().trust_domain().to_string();
    if Role::of(client.caller(), &td) != Some(Role::Superuser) {
        return Err(Error::Usage(format!(
            "operator rotate needs an operator SVID with the superuser role \
             (spiffe://{td}/spike/pilot/role/superuser); SPIKE_SVID_DIR names {}",
            client.caller()
        )));
    }
    let op = Op {
        permission: "rotate",
        resource: "the keyring",
        subject: "the keyring".into(),
        invalid_hint: "rotation needs a Nexus of this version with its root key loaded",
        write: true,
    };
    let resp = client
        .rotate()
        .await
        .map_err(|e| nexus_failure(&client, &op, e))?;
    match format {
        Format::Json => print_json(&resp),
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
            stdout(text.as_bytes())
        }
    }
}
