//! The secret rules both ends apply: SPIKE's path characters and length, the reserved
//! `spike/system/` prefix, and key names.

use std::collections::BTreeMap;

/// Longest secret path accepted (SPIKE's limit).
pub const MAX_PATH_LEN: usize = 500;
/// Longest key name inside a secret.
pub const MAX_KEY_LEN: usize = 250;
/// Paths under this prefix name authorisation pseudo-resources, never secrets.
pub const RESERVED_PREFIX: &str = "spike/system/";

/// SPIKE's secret-path characters: letters, digits and `._-/()?+*|[]{}\`.
pub fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '.' | '_'
                | '-'
                | '/'
                | '('
                | ')'
                | '?'
                | '+'
                | '*'
                | '|'
                | '['
                | ']'
                | '{'
                | '}'
                | '\\'
        )
}

/// Checks a secret path: SPIKE's character set and length, no empty, `.` or `..` segment, and
/// nothing under the reserved `spike/system/` prefix.
pub fn validate_path(path: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid secret path: {why}"));
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return bad("must be 1 to 500 characters");
    }
    if !path.chars().all(is_path_char) {
        return bad("allowed characters are letters, digits and ._-/()?+*|[]{}\\");
    }
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("no empty, '.' or '..' segments (and no leading or trailing '/')");
    }
    if path.starts_with(RESERVED_PREFIX) || path == "spike/system" {
        return bad("paths under spike/system/ are reserved");
    }
    Ok(())
}

/// Checks the key names of a secret's values.
pub fn validate_values(values: &BTreeMap<String, String>) -> Result<(), String> {
    if values.is_empty() {
        return Err("a secret needs at least one KEY=VALUE".into());
    }
    for key in values.keys() {
        if key.is_empty()
            || key.len() > MAX_KEY_LEN
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | ' ' | '.'))
        {
            return Err(
                "invalid key name: 1 to 250 letters, digits, '-', '_', '.' or spaces".into(),
            );
        }
    }
    Ok(())
}
