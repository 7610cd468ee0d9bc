//! Entry points: the command line ([`cli`]) and `spike dev` ([`dev`]), which composes every
//! other part into a local system. Nothing else imports this part.

pub mod cli;
pub mod dev;
