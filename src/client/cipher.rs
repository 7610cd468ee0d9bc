//! `spike cipher encrypt|decrypt [--in F] [--out F]`.
//!
//! Text format (the default) is SPIKE's stream mode: the input bytes go to Nexus as
//! `application/octet-stream` and the answer bytes are written as they are, so any binary data
//! works; a ciphertext is `0x01 ‖ nonce(12) ‖ ciphertext‖tag`. `--format json` uses SPIKE's JSON
//! mode: `encrypt` prints `{"version":2,"nonce":"<b64>","ciphertext":"<b64>"}`, and `decrypt`
//! reads that object and prints `{"plaintext":"<b64>"}`.
//!
//! Input is stdin unless `--in` names a file; output is stdout unless `--out` names one,
//! created (or truncated) with mode 0600 since it holds a plaintext or a ciphertext. `-` means
//! stdin / stdout.

use std::io::Read;
use std::path::Path;

use super::args::{CipherCommand, CipherIo, Format};
use super::run::{Error, Op, Result, connect, nexus_failure, stdout};
use crate::protocol::nexus::ErrorCode;
use crate::protocol::nexus::{DecryptRequest, DecryptResponse};

/// The pseudo-path the cipher is authorised on.
use crate::protocol::policy::CIPHER_PATH;

fn is_std(path: Option<&Path>) -> Option<&Path> {
    path.filter(|p| p.as_os_str() != "-")
}

fn read_input(path: Option<&Path>) -> Result<Vec<u8>> {
    match is_std(path) {
        Some(file) => std::fs::read(file)
            .map_err(|e| Error::Usage(format!("cannot read {}: {e}", file.display()))),
        None => {
            let mut data = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut data)
                .map_err(|e| Error::Failed(format!("cannot read stdin: {e}")))?;
            Ok(data)
        }
    }
}

fn write_output(path: Option<&Path>, data: &[u8]) -> Result<()> {
    match is_std(path) {
        None => stdout(data),
        Some(file) => crate::platform::fs::replace(file, data, crate::platform::fs::PRIVATE)
            .map_err(|e| Error::Failed(format!("cannot write {}: {e}", file.display()))),
    }
}

/// Runs one `spike cipher` command.
pub async fn run(format: Format, command: CipherCommand) -> Result<()> {
    let (encrypt, io) = match command {
        CipherCommand::Encrypt(io) => (true, io),
        CipherCommand::Decrypt(io) => (false, io),
    };
    let CipherIo { input, out } = io;
    let data = read_input(input.as_deref())?;
    let json_request = if !encrypt && format == Format::Json {
        Some(
            serde_json::from_slice::<DecryptRequest>(&data).map_err(|e| {
                Error::Usage(format!(
                    "the input is not a JSON ciphertext {{\"version\",\"nonce\",\"ciphertext\"}} \
                     as `spike cipher encrypt --format json` prints it ({e})"
                ))
            })?,
        )
    } else {
        None
    };
    let client = connect().await?;
    let op = Op {
        permission: "execute",
        resource: CIPHER_PATH,
        subject: "the cipher".into(),
        invalid_hint: if encrypt {
            "the input may be over Nexus's size limit"
        } else {
            "the input is not a ciphertext from `spike cipher encrypt` of this deployment, or it \
             was altered"
        },
        write: false,
    };
    let fail = |e| nexus_failure(&client, &op, e);
    let output = match (encrypt, json_request) {
        (true, _) if format == Format::Json => {
            let resp = client.encrypt_json(data).await.map_err(fail)?;
            json_line(&resp)?
        }
        (true, _) => client.encrypt_stream(data).await.map_err(fail)?,
        (false, Some(req)) => {
            let plaintext = client.decrypt_json(&req).await.map_err(|e| {
                if e.code() == Some(ErrorCode::ApiInternalError) {
                    // SPIKE answers 500 when a JSON-mode ciphertext fails to open.
                    Error::Failed(format!(
                        "Nexus could not decrypt the input (api_internal_error): {}",
                        op.invalid_hint
                    ))
                } else {
                    fail(e)
                }
            })?;
            json_line(&DecryptResponse { plaintext })?
        }
        (false, None) => client.decrypt_stream(data).await.map_err(fail)?,
    };
    write_output(out.as_deref(), &output)
}

fn json_line<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(value)
        .map_err(|e| Error::Failed(format!("cannot encode the answer as JSON: {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dash_means_standard_streams() {
        assert_eq!(is_std(Some(Path::new("-"))), None);
        assert_eq!(is_std(None), None);
        assert_eq!(is_std(Some(Path::new("f"))), Some(Path::new("f")));
    }

    #[test]
    fn output_files_are_private_and_binary_safe() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out.bin");
        let data: Vec<u8> = (0..=255).collect();
        write_output(Some(&file), &data).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), data);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(read_input(Some(&file)).unwrap(), data);
        let err = read_input(Some(&dir.path().join("missing"))).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
