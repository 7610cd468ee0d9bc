//! HTTPS over mutual TLS, both ends: the server loop Nexus and Keeper share ([`server`]) and the
//! client Nexus uses to reach Keepers and the CLI uses to reach Nexus ([`client`]).

pub mod client;
pub mod server;

pub use client::{HttpsClient, Reply, Timeouts};
pub use server::{
    BodyError, Handler, Limits, Listen, OwnIdentity, Peer, StartError, bind, bytes, error, json,
    json_secret, read_body, serve, wipe_body,
};
