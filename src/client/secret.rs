//! `spike secret put|get|list|delete|undelete|metadata`.
//!
//! Text output (stdout unless said otherwise):
//! - `put`: nothing on stdout; `wrote PATH version N` on stderr.
//! - `get`: `KEY=VALUE` lines sorted by key; with KEY, only that value, as is (a newline is
//!   added only when stdout is a terminal, so `$(...)` and redirections get the exact value).
//! - `list`: one path per line.
//! - `delete` / `undelete`: nothing on stdout; `deleted PATH versions 1,2` (or `deleted the
//!   current version of PATH`, `undeleted ...`) on stderr.
//! - `metadata`: a `field  value` block, a blank line, then a `VERSION CREATED DELETED` table.
//!
//! `--format json` prints the response object: `{"version":N}` for put, `{"data":{..},
//! "version":N}` for get (the value as a JSON string with KEY), `{"keys":[..]}` for list, `{}`
//! for delete and undelete, SPIKE's metadata object for metadata.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use super::args::{Format, SecretCommand};
use super::run::{Error, Op, Result, connect, nexus_failure, print_json, stdout, table};
use crate::protocol::nexus::ErrorCode;
use crate::protocol::nexus::{
    Empty, SecretListResponse, SecretMetadataResponse, SecretPutResponse,
};

const INVALID_SECRET: &str = "check the path (letters, digits and ._-/()?+*|[]{}\\ between \
                              non-empty segments, nothing under spike/system/) and the key names \
                              (letters, digits, '-', '_', '.' and spaces)";

/// A `--versions 1,2` list: sorted, without duplicates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionList(pub Vec<u64>);

/// Parses `--versions`: version numbers separated by commas.
pub fn parse_versions(text: &str) -> std::result::Result<VersionList, String> {
    let mut versions = text
        .split(',')
        .map(|v| {
            let v = v.trim();
            v.parse::<u64>().map_err(|_| {
                format!(
                    "{v:?} is not a version number (expected numbers separated by commas, like 1,2)"
                )
            })
        })
        .collect::<std::result::Result<Vec<u64>, String>>()?;
    versions.sort_unstable();
    versions.dedup();
    Ok(VersionList(versions))
}

/// Turns `KEY=VALUE` arguments into a map. Splits at the first `=`; a missing `=`, an empty
/// key or a key given twice is a usage error. Never echoes an argument: it may be a secret.
pub fn parse_values(args: &[String]) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut values = BTreeMap::new();
    for (i, arg) in args.iter().enumerate() {
        let n = i + 1;
        let Some((key, value)) = arg.split_once('=') else {
            return Err(format!(
                "value argument {n} has no '=': give KEY=VALUE pairs (not echoed: it may be a secret)"
            ));
        };
        if key.is_empty() {
            return Err(format!(
                "value argument {n} has an empty key: give KEY=VALUE pairs"
            ));
        }
        if values.insert(key.to_string(), value.to_string()).is_some() {
            return Err(format!("key {key:?} is given twice"));
        }
    }
    Ok(values)
}

fn join(versions: &[u64]) -> String {
    versions
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn subject(path: &str, version: Option<u64>) -> String {
    match version {
        Some(v) if v > 0 => format!("{path} version {v}"),
        _ => path.to_string(),
    }
}

/// What a read of `path` (at `version`) asks of Nexus, for error messages.
fn read_op(path: &str, version: Option<u64>) -> Op<'_> {
    Op {
        permission: "read",
        resource: path,
        subject: subject(path, version),
        invalid_hint: INVALID_SECRET,
        write: false,
    }
}

/// Runs one `spike secret` command.
pub async fn run(format: Format, command: SecretCommand) -> Result<()> {
    match command {
        SecretCommand::Put { path, values, cas } => {
            let values = parse_values(&values).map_err(Error::Usage)?;
            let client = connect().await?;
            let version =
                client
                    .secret_put(&path, values, cas)
                    .await
                    .map_err(|e| match (e.code(), cas) {
                        (Some(ErrorCode::ApiConflict), Some(0)) => Error::Failed(format!(
                            "{path} already exists (check-and-set with --cas 0 failed)"
                        )),
                        (Some(ErrorCode::ApiConflict), Some(n)) => Error::Failed(format!(
                            "{path} is not at version {n} (check-and-set failed)"
                        )),
                        _ => nexus_failure(
                            &client,
                            &Op {
                                permission: "write",
                                resource: &path,
                                subject: path.clone(),
                                invalid_hint: INVALID_SECRET,
                                write: true,
                            },
                            e,
                        ),
                    })?;
            match format {
                Format::Json => print_json(&SecretPutResponse { version }),
                Format::Text => {
                    if version > 0 {
                        eprintln!("wrote {path} version {version}");
                    } else {
                        // A SPIKE Nexus answers a put with `{}`.
                        eprintln!("wrote {path}");
                    }
                    Ok(())
                }
            }
        }
        SecretCommand::Get { path, key, version } => {
            let client = connect().await?;
            let op = read_op(&path, version);
            let resp = client
                .secret_get(&path, version)
                .await
                .map_err(|e| nexus_failure(&client, &op, e))?;
            match key {
                Some(key) => {
                    let value = resp.data.get(&key).ok_or_else(|| {
                        Error::Failed(format!(
                            "{path} version {} has no key {key:?}",
                            resp.version
                        ))
                    })?;
                    match format {
                        Format::Json => print_json(value),
                        Format::Text => {
                            let mut out = value.clone();
                            if std::io::stdout().is_terminal() {
                                out.push('\n');
                            }
                            stdout(out.as_bytes())
                        }
                    }
                }
                None => match format {
                    Format::Json => print_json(&resp),
                    Format::Text => stdout(format_values(&resp.data).as_bytes()),
                },
            }
        }
        SecretCommand::List { prefix } => {
            let client = connect().await?;
            let op = Op {
                permission: "list",
                resource: crate::protocol::policy::SECRET_LIST_PATH,
                subject: "the secret list".into(),
                invalid_hint: "check the prefix",
                write: false,
            };
            let resp = client
                .secret_list(prefix.as_deref())
                .await
                .map_err(|e| nexus_failure(&client, &op, e))?;
            match format {
                Format::Json => print_json(&resp),
                Format::Text => stdout(format_list(&resp).as_bytes()),
            }
        }
        SecretCommand::Delete { path, versions } => {
            versions_command(format, "delete", path, versions).await
        }
        SecretCommand::Undelete { path, versions } => {
            versions_command(format, "undelete", path, versions).await
        }
        SecretCommand::Metadata { path, version } => {
            let client = connect().await?;
            let op = read_op(&path, version);
            let resp = client
                .secret_metadata(&path, version)
                .await
                .map_err(|e| nexus_failure(&client, &op, e))?;
            match format {
                Format::Json => print_json(&resp),
                Format::Text => stdout(format_metadata(&path, &resp).as_bytes()),
            }
        }
    }
}

async fn versions_command(
    format: Format,
    verb: &'static str,
    path: String,
    versions: Option<VersionList>,
) -> Result<()> {
    let versions = versions.map(|v| v.0).unwrap_or_default();
    let client = connect().await?;
    let op = Op {
        permission: "write",
        resource: &path,
        subject: if versions.is_empty() {
            path.clone()
        } else {
            format!("{path} versions {}", join(&versions))
        },
        invalid_hint: INVALID_SECRET,
        write: true,
    };
    let call = if verb == "delete" {
        client.secret_delete(&path, versions.clone()).await
    } else {
        client.secret_undelete(&path, versions.clone()).await
    };
    call.map_err(|e| nexus_failure(&client, &op, e))?;
    match format {
        Format::Json => print_json(&Empty {}),
        Format::Text => {
            if versions.is_empty() && verb == "delete" {
                eprintln!("deleted the current version of {path}");
            } else if versions.is_empty() {
                eprintln!("undeleted {path}");
            } else {
                eprintln!("{verb}d {path} versions {}", join(&versions));
            }
            Ok(())
        }
    }
}

/// `KEY=VALUE` lines, sorted by key.
pub fn format_values(data: &BTreeMap<String, String>) -> String {
    data.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// One path per line.
pub fn format_list(resp: &SecretListResponse) -> String {
    resp.keys.iter().map(|k| format!("{k}\n")).collect()
}

/// The metadata block and the version table.
pub fn format_metadata(path: &str, resp: &SecretMetadataResponse) -> String {
    let m = &resp.metadata;
    let mut out = table(&[
        vec!["path".into(), path.to_string()],
        vec!["current version".into(), m.current_version.to_string()],
        vec!["oldest version".into(), m.oldest_version.to_string()],
        vec!["max versions".into(), m.max_versions.to_string()],
        vec!["created".into(), m.created_time.clone()],
        vec!["updated".into(), m.updated_time.clone()],
    ]);
    let mut versions: Vec<_> = resp.versions.values().collect();
    versions.sort_by_key(|v| v.version);
    let mut rows = vec![vec![
        "VERSION".to_string(),
        "CREATED".into(),
        "DELETED".into(),
    ]];
    rows.extend(versions.into_iter().map(|v| {
        vec![
            v.version.to_string(),
            v.created_time.clone(),
            v.deleted_time.clone().unwrap_or_else(|| "-".into()),
        ]
    }));
    out.push('\n');
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::nexus::{SecretMetadata, VersionInfo};

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn key_values_split_at_the_first_equals_sign() {
        let map = parse_values(&strings(&["user=admin", "pass=a=b=", "empty="])).unwrap();
        assert_eq!(map["user"], "admin");
        assert_eq!(map["pass"], "a=b=");
        assert_eq!(map["empty"], "");
    }

    #[test]
    fn bad_key_values_are_refused_without_echoing_them() {
        let err = parse_values(&strings(&["a=1", "hunter2"])).unwrap_err();
        assert!(err.contains("argument 2 has no '='"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let err = parse_values(&strings(&["=secret"])).unwrap_err();
        assert!(
            err.contains("empty key") && !err.contains("secret\""),
            "{err}"
        );
        let err = parse_values(&strings(&["a=1", "a=2"])).unwrap_err();
        assert!(err.contains("\"a\" is given twice"), "{err}");
    }

    #[test]
    fn version_lists() {
        assert_eq!(parse_versions("1,2").unwrap(), VersionList(vec![1, 2]));
        assert_eq!(parse_versions("3, 1,3").unwrap(), VersionList(vec![1, 3]));
        assert_eq!(parse_versions("0").unwrap(), VersionList(vec![0]));
        for bad in ["", "1,", "a", "1;2", "-1", "1.5"] {
            assert!(parse_versions(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_formats() {
        let data: BTreeMap<String, String> = [
            ("b".to_string(), "2".to_string()),
            ("a".into(), "x=y".into()),
        ]
        .into();
        assert_eq!(format_values(&data), "a=x=y\nb=2\n");
        let resp = SecretMetadataResponse {
            versions: [1u64, 2, 10]
                .iter()
                .map(|&v| {
                    (
                        v.to_string(),
                        VersionInfo {
                            created_time: format!("c{v}"),
                            version: v,
                            deleted_time: (v == 2).then(|| "d2".to_string()),
                        },
                    )
                })
                .collect(),
            metadata: SecretMetadata {
                current_version: 10,
                oldest_version: 1,
                created_time: "c1".into(),
                updated_time: "c10".into(),
                max_versions: 10,
            },
        };
        assert_eq!(
            format_metadata("secrets/db", &resp),
            "path             secrets/db\n\
             current version  10\n\
             oldest version   1\n\
             max versions     10\n\
             created          c1\n\
             updated          c10\n\
             \n\
             VERSION  CREATED  DELETED\n\
             1        c1       -\n\
             2        c2       d2\n\
             10       c10      -\n"
        );
    }
}
