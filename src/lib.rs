//! `spike`: a SPIFFE-native secrets manager after SPIKE, built for high availability on bare
//! metal and VMs. One crate, one binary; each folder under `src/` is one part of the system.
//!
//! A request flows one way — transport → identity → policy → store → crypto → response — and a
//! part imports only the parts below it in this table (`tests/layers.rs` enforces it):
//!
//! | part | concern | may import |
//! |---|---|---|
//! | [`entry`] | the command line, `spike dev` | everything |
//! | [`backup`] | `spike backup`: online backups of the store, verified and restored into any backend | nexus, client, store, protocol, crypto, platform |
//! | [`migrate`] | `spike migrate from-spike`: read a SPIKE store, write into ours | nexus, client, store, transport, identity, protocol, crypto, platform |
//! | [`nexus`] | `spike nexus`: key lifecycle, Keeper sync, routes, policies, secrets, health | client, store, transport, identity, protocol, crypto, platform |
//! | [`keeper`] | `spike keeper`: one shard in memory | transport, identity, protocol, crypto, platform |
//! | [`client`] | the Nexus and Keeper clients and the CLI verbs | transport, identity, protocol, crypto, platform |
//! | [`store`] | the backing-store trait, its backends and their settings | protocol, crypto, platform |
//! | [`transport`] | HTTPS over mutual TLS: the server loop and the client | identity, protocol, platform |
//! | [`identity`] | SPIFFE IDs, SVIDs, rustls verifiers, dev PKI | protocol, platform |
//! | [`protocol`] | the wire types of Nexus and Keeper and the rules both ends apply | crypto, platform |
//! | [`crypto`] | root key, AEAD, Shamir shards, recovery-shard text | platform |
//! | [`platform`] | environment as configuration, systemd, hardening, signals, Prometheus metrics | — |
//!
//! The design, the wire contract and the decisions that differ from SPIKE are in `docs/`.

#![warn(missing_docs)]

pub mod backup;
pub mod client;
pub mod crypto;
pub mod entry;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod identity;
pub mod keeper;
pub mod migrate;
pub mod nexus;
pub mod platform;
pub mod protocol;
pub mod store;
pub mod transport;
