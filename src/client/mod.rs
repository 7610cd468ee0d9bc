//! The client side: the typed Nexus client ([`nexus`]) and the CLI verbs built on it
//! (`spike secret`, `spike policy`, `spike cipher`, `spike recover`, `spike audit`), run by
//! [`run`].

pub mod args;
pub mod audit;
pub mod cipher;
pub mod config;
pub mod keeper;
pub mod nexus;
pub mod operator;
pub mod policy;
pub mod recover;
pub mod run;
pub mod secret;
