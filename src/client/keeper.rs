//! The Keeper client: the one place that speaks [`crate::protocol::keeper`] from Nexus's side,
//! used by Nexus's Keeper sync, by `spike dev` and by the tools that ask the Keepers as a Nexus
//! (`spike migrate`, `spike backup`: [`tls_as_nexus`]).
//!
//! Request bodies are built from the protocol types, never by hand; a shard read back is
//! checked (32 bytes, a valid scalar) and labelled with the index the Keeper holds it under.

use hyper::{StatusCode, Uri};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::Share;
use crate::identity::{ExpectedPeer, IdentityConfig, Role};
use crate::platform::CommandError;
use crate::protocol::keeper::{CONTRIBUTE_PATH, ContributeRequest, SHARD_PATH, ShardResponse};
use crate::transport::{HttpsClient, OwnIdentity};

/// Largest answer a Keeper sends: a shard response is well under 1 KiB.
pub const MAX_RESPONSE: usize = 4096;

/// What a Keeper said when asked for its shard.
pub enum ShardAnswer {
    /// The shard it holds, labelled with its index (the one it stored, or its position in the
    /// peer list when it stored none, as SPIKE's Keepers do).
    Shard(Share),
    /// It holds nothing (a Keeper restarted since it was last filled).
    Empty,
}

impl std::fmt::Debug for ShardAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardAnswer::Shard(s) => write!(f, "Shard(index {})", s.index),
            ShardAnswer::Empty => f.write_str("Empty"),
        }
    }
}

/// Why a Keeper call failed. Never carries shard bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No answer: connection, TLS or timeout.
    #[error("keeper did not answer: {0}")]
    Transport(#[from] crate::transport::client::Error),
    /// An answer that is not the protocol's.
    #[error("keeper gave an unexpected answer ({status})")]
    Unexpected {
        /// The HTTP status it answered with.
        status: StatusCode,
    },
    /// A shard that is not a valid share.
    #[error("keeper returned an invalid shard: {0}")]
    InvalidShard(String),
    /// The Keeper refused the shard Nexus sent.
    #[error("keeper refused the shard ({status})")]
    Refused {
        /// The HTTP status it answered with.
        status: StatusCode,
    },
}

/// The TLS configuration of a command that asks the Keepers for their shards as a Nexus does
/// (`spike migrate`, `spike backup`): it presents this process's SVID from `identity` (a
/// Nexus's settings: SVID files or the Workload API), which must carry the Nexus role, and
/// expects Keeper IDs. Keep the returned [`OwnIdentity`] as long as the configuration: it
/// follows SVID rotation. `runs_as` ends the error message, e.g. "the migration runs as a
/// Nexus". Exit status 3 when the SPIFFE agent gave no identity, as for a server; 2 when no
/// identity source is configured at all (a one-shot command is not retried by a supervisor).
pub async fn tls_as_nexus(
    identity: &IdentityConfig,
    runs_as: &str,
) -> Result<(OwnIdentity, std::sync::Arc<rustls::ClientConfig>), CommandError> {
    let own = OwnIdentity::load(identity, Role::Nexus, None)
        .await
        .map_err(|e| {
            let why = format!("{e} ({runs_as}: same SVID, store and Keeper settings)");
            let unconfigured = matches!(
                &e,
                crate::transport::StartError::Identity(
                    crate::identity::Error::NoIdentitySource { .. }
                )
            );
            if e.is_agent_unavailable() && !unconfigured {
                CommandError::NoIdentity(why)
            } else {
                CommandError::usage(why)
            }
        })?;
    let tls = crate::identity::client_config_for(
        Some(&own.source),
        None,
        &identity.trust,
        ExpectedPeer::Role(Role::Keeper),
    )
    .map_err(CommandError::usage)?;
    Ok((own, tls))
}

/// Talks to Keepers over an mTLS client that presents a Nexus identity.
#[derive(Clone)]
pub struct KeeperClient {
    https: HttpsClient,
}

impl KeeperClient {
    /// A client over `https`, whose TLS configuration must present a Nexus SVID.
    pub fn new(https: HttpsClient) -> KeeperClient {
        KeeperClient { https }
    }

    /// Asks the Keeper at `url` for its shard. `position` is the Keeper's 1-based place in the
    /// peer list, the index assumed when the Keeper stored none.
    pub async fn shard(&self, url: &Uri, position: u8) -> Result<ShardAnswer, Error> {
        let reply = self
            .https
            .post_json(url, SHARD_PATH, b"{}".to_vec())
            .await?;
        let parsed = serde_json::from_slice::<ShardResponse>(&reply.body);
        match (reply.status, parsed) {
            (StatusCode::OK, Ok(mut resp)) => {
                let Some(mut value) = resp.shard.take() else {
                    return Err(Error::Unexpected {
                        status: reply.status,
                    });
                };
                let share = Share::new(resp.id.unwrap_or(position), value);
                value.zeroize();
                share
                    .map(ShardAnswer::Shard)
                    .map_err(|e| Error::InvalidShard(e.to_string()))
            }
            (StatusCode::BAD_REQUEST, Ok(resp)) if resp.shard.is_none() => Ok(ShardAnswer::Empty),
            (status, _) => Err(Error::Unexpected { status }),
        }
    }

    /// Sends the Keeper at `url` its shard, with its index.
    pub async fn contribute(&self, url: &Uri, share: &Share) -> Result<(), Error> {
        let request = ContributeRequest {
            shard: Some(*share.value()),
            id: Some(share.index),
        };
        // The body holds the shard: serialized straight into a buffer that is wiped when hyper
        // drops it (best effort: hyper's own write buffers are not zeroized), never copied.
        // Reserved up front (32 numbers of up to 3 digits and the index fit in 256 bytes), so
        // serializing never reallocates and leaves a copy behind.
        let mut body = Zeroizing::new(Vec::with_capacity(256));
        if serde_json::to_writer(&mut *body, &request).is_err() {
            body.clear();
        }
        let mut request = request;
        if let Some(s) = request.shard.as_mut() {
            s.zeroize();
        }
        let reply = self
            .https
            .post_json_secret(url, CONTRIBUTE_PATH, body)
            .await?;
        if reply.status == StatusCode::OK {
            Ok(())
        } else {
            Err(Error::Refused {
                status: reply.status,
            })
        }
    }
}
