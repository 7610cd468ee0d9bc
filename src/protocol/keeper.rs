//! The Keeper's wire protocol (SPIKE's routes and shapes), shared by the Keeper server and the
//! Nexus-side Keeper client.

use serde::{Deserialize, Serialize};

pub const CONTRIBUTE_PATH: &str = "/v1/store/contribute";
pub const SHARD_PATH: &str = "/v1/store/shard";

/// `POST /v1/store/contribute` body. `id` is our addition (SPIKE sends only `shard`).
#[derive(Deserialize)]
pub struct ContributeRequest {
    pub shard: Option<[u8; 32]>,
    #[serde(default)]
    pub id: Option<u8>,
}

/// `POST /v1/store/shard` answer: SPIKE's shape (with its capitalised `Err`), plus `id`.
#[derive(Serialize, Deserialize)]
pub struct ShardResponse {
    pub shard: Option<[u8; 32]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u8>,
    #[serde(rename = "Err", alias = "err", default)]
    pub err: String,
}
