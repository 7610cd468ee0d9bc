//! The client commands: `spike secret`, `spike policy`, `spike cipher`, `spike recover`
//! (DESIGN.md §7).
//!
//! Each command checks its arguments first (a mistake there exits 2 before anything is loaded
//! or sent), then builds a [`NexusClient`] from the client environment, makes one call, and
//! prints. Conventions shared by every command:
//! - data on stdout, messages on stderr; `--format json` prints the response object on one
//!   line (`{}` for operations whose answer is empty) and no messages;
//! - exit status 0 on success; 1 when the operation failed (an error answered by Nexus or its
//!   store, Nexus unreachable, the output not writable); 2 when the invocation or its inputs are
//!   wrong (arguments, an unreadable or invalid input file, an incomplete client environment);
//! - an error is one line a person can act on: who was refused what, which URLs were tried,
//!   what to set. Secret values are never echoed, not even a malformed `KEY=VALUE` argument.

use std::future::Future;
use std::io::Write;

use serde::Serialize;

use crate::client::nexus::{self as nexus_api, NexusClient};
use crate::platform::CommandError;
use crate::platform::env::ProcessEnv;
use crate::protocol::nexus::ErrorCode;
use crate::transport::client::Error as TransportError;

/// A failed client command, with the exit status it maps to ([`CommandError`]).
pub type Error = CommandError;

/// Result of a client command.
pub type Result<T> = std::result::Result<T, Error>;

/// Runs a client command on a current-thread runtime: one call, nothing to run in parallel.
pub fn block_on(command: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Failed(format!("cannot start the async runtime: {e}")))?
        .block_on(command)
}

/// The client for the process environment. Its problems are configuration problems (exit 2).
pub async fn connect() -> Result<NexusClient> {
    NexusClient::from_env(&ProcessEnv)
        .await
        .map_err(|e| match e {
            // It names the variables itself.
            nexus_api::Error::Identity(e @ crate::identity::Error::NoIdentitySource { .. }) => {
                Error::Usage(e.to_string())
            }
            nexus_api::Error::Identity(e) => Error::Usage(format!(
                "cannot load your SVID: {e} (SPIFFE_ENDPOINT_SOCKET, or SPIKE_SVID_DIR, or \
             SPIKE_SVID_CERT, SPIKE_SVID_KEY and SPIKE_SVID_BUNDLE, must give the identity you \
             act as)"
            )),
            other => Error::Usage(other.to_string()),
        })
}

/// Refuses, before anything is sent, a command that needs the operator `role` when the
/// caller's SVID (from files or the Workload API) holds another: `what` names the command.
pub(crate) fn require_role(
    client: &NexusClient,
    role: crate::identity::Role,
    what: &str,
) -> Result<()> {
    let caller = client.caller();
    let td = caller.trust_domain();
    if crate::identity::Role::of(caller, td) == Some(role) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "{what} needs an operator SVID with the {role} role (spiffe://{td}/spike/pilot/role/{role}); your SVID is {caller}"
    )))
}

/// What a command asked of Nexus, to turn a refusal into a message that says what to fix.
pub(crate) struct Op<'a> {
    /// The permission Nexus checks ...
    pub permission: &'static str,
    /// ... and the path it checks it on (a secret path, or a `spike/system/...` pseudo-path).
    pub resource: &'a str,
    /// What a 404 is about: `secrets/db`, `secrets/db version 3`, `policy web`.
    pub subject: String,
    /// What to check when Nexus calls the request invalid.
    pub invalid_hint: &'static str,
    /// True if the request changes stored state (never replayed after it may have been sent).
    pub write: bool,
}

/// Turns an error of a call to Nexus into the command's error.
pub(crate) fn nexus_failure(client: &NexusClient, op: &Op<'_>, e: nexus_api::Error) -> Error {
    let message = match e {
        nexus_api::Error::Api {
            url,
            code,
            reason: Some(reason),
            ..
        } => format!("Nexus at {url}: {reason} ({code})"),
        nexus_api::Error::Api {
            url, status, code, ..
        } => match ErrorCode::parse(&code) {
            Some(ErrorCode::AccessUnauthorized) => format!(
                "no policy grants {} {} on {} (access_unauthorized)",
                client.caller(),
                op.permission,
                op.resource
            ),
            Some(ErrorCode::ApiNotFound) => format!("{} not found", op.subject),
            Some(ErrorCode::ApiBadRequest) => format!(
                "Nexus at {url} rejected the request as invalid (api_bad_request): {}",
                op.invalid_hint
            ),
            Some(ErrorCode::ApiRequestTooLarge) => {
                format!("the request is larger than Nexus at {url} accepts (api_request_too_large)")
            }
            Some(ErrorCode::ApiInternalError) => format!(
                "Nexus at {url} could not carry out the request (api_internal_error); its log \
                 has the details"
            ),
            Some(ErrorCode::StateNotReady) => format!(
                "Nexus at {url} has no root key yet (waiting for Keepers or a restore); try \
                 again shortly"
            ),
            Some(ErrorCode::StoreUnavailable) => format!(
                "Nexus at {url} cannot reach its backing store (store_unavailable); try again \
                 shortly"
            ),
            Some(ErrorCode::AuditUnavailable) => format!(
                "Nexus at {url} cannot write its audit trail, so it answers nothing \
                 (audit_unavailable); if this was a write, it may have been made: check before \
                 retrying"
            ),
            Some(ErrorCode::ApiConflict) | None => {
                format!("Nexus at {url} answered {status} ({code})")
            }
        },
        nexus_api::Error::Transport { attempts }
            if op.write && matches!(attempts.last(), Some(TransportError::NoAnswer { .. })) =>
        {
            let last = attempts.last().map(attempt_reason).unwrap_or_default();
            format!(
                "no answer from Nexus after sending the request ({last}); the change may or may \
                 not have been made: check before retrying"
            )
        }
        nexus_api::Error::Transport { attempts } => {
            let tried: Vec<String> = client
                .urls()
                .iter()
                .take(attempts.len().max(1))
                .map(|u| u.to_string().trim_end_matches('/').to_string())
                .collect();
            let reasons: Vec<String> = attempts.iter().map(attempt_reason).collect();
            format!(
                "cannot reach Nexus (tried {}; set SPIKE_NEXUS_API_URL): {}",
                tried.join(", "),
                reasons.join("; ")
            )
        }
        other => other.to_string(),
    };
    Error::Failed(message)
}

fn attempt_reason(e: &TransportError) -> String {
    match e {
        TransportError::Unsent { reason, .. } => reason.clone(),
        TransportError::NoAnswer { reason, .. } => format!("no answer: {reason}"),
    }
}

/// Writes `bytes` to stdout and flushes.
pub(crate) fn stdout(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Error::Failed(format!("cannot write to stdout: {e}")))
}

/// Prints `value` as one line of JSON on stdout.
pub(crate) fn print_json<T: Serialize>(value: &T) -> Result<()> {
    let mut text = serde_json::to_string(value)
        .map_err(|e| Error::Failed(format!("cannot encode the answer as JSON: {e}")))?;
    text.push('\n');
    stdout(text.as_bytes())
}

/// Lays out rows in columns separated by two spaces; the last column is not padded.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[c] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_do_not_pad_the_last() {
        let rows = vec![
            vec!["VERSION".to_string(), "CREATED".into(), "DELETED".into()],
            vec!["1".to_string(), "t1".into(), "-".into()],
            vec!["10".to_string(), "t10".into(), "t".into()],
        ];
        assert_eq!(
            table(&rows),
            "VERSION  CREATED  DELETED\n1        t1       -\n10       t10      t\n"
        );
        assert_eq!(table(&[]), "");
    }

    #[test]
    fn exit_codes() {
        assert_eq!(Error::Usage("x".into()).exit_code(), 2);
        assert_eq!(Error::Failed("x".into()).exit_code(), 1);
    }
}
