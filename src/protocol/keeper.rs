//! The Keeper's wire protocol (SPIKE's routes and shapes), shared by the Keeper server and the
//! Nexus-side Keeper client.

use serde::{Deserialize, Serialize};

/// Nexus pushes a Keeper its shard.
pub const CONTRIBUTE_PATH: &str = "/v1/store/contribute";
/// Nexus reads a Keeper's shard back.
pub const SHARD_PATH: &str = "/v1/store/shard";

/// `POST /v1/store/contribute` body. `id` is our addition (SPIKE sends only `shard`).
#[derive(Serialize, Deserialize)]
pub struct ContributeRequest {
    /// The shard: 32 bytes, a JSON array of numbers as Go encodes `[32]byte`.
    pub shard: Option<[u8; 32]>,
    /// The shard's Shamir index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u8>,
}

/// `POST /v1/store/shard` answer: SPIKE's shape (with its capitalised `Err`), plus `id`.
#[derive(Serialize, Deserialize)]
pub struct ShardResponse {
    /// The shard held, if any.
    pub shard: Option<[u8; 32]>,
    /// The index it was stored under, if Nexus sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u8>,
    /// SPIKE's error text; empty on success.
    #[serde(rename = "Err", alias = "err", default)]
    pub err: String,
}
