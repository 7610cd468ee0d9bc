//! The wire protocols, shared by the servers and the clients so the two cannot drift apart:
//! [`nexus`] (the secrets API SPIKE's SDK and Pilot speak) and [`keeper`] (Nexus ↔ Keeper).
//!
//! Nothing here does I/O; these are types, constants and the rules both sides apply.

pub mod audit;
pub mod keeper;
pub mod nexus;
pub mod policy;
pub mod secret;
