//! How a `spike` command ends: the one failure type of every subcommand and the exit status it
//! maps to (docs/wire.md: 0 success, 1 failure, 2 usage, 3 no identity from the SPIFFE agent).

/// A failed command, with its exit status. The message is one line a person can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The invocation, its inputs or the configuration are wrong: exit status 2.
    #[error("{0}")]
    Usage(String),
    /// The operation failed (Nexus or the store refused, a server stopped on an error): 1.
    #[error("{0}")]
    Failed(String),
    /// The SPIFFE agent gave a server no identity in time: 3, so a supervisor or an operator
    /// can tell "the agent is away" from any other failure.
    #[error("{0}")]
    NoIdentity(String),
}

impl CommandError {
    /// A usage error from anything printable.
    pub fn usage(e: impl std::fmt::Display) -> CommandError {
        CommandError::Usage(e.to_string())
    }

    /// A failure from anything printable.
    pub fn failed(e: impl std::fmt::Display) -> CommandError {
        CommandError::Failed(e.to_string())
    }

    /// The exit status.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Failed(_) => 1,
            CommandError::Usage(_) => 2,
            CommandError::NoIdentity(_) => 3,
        }
    }
}
