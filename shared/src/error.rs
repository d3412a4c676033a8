//! The crate-wide error: few variants, each telling the caller what to do
//! (fix the input, retry later, give up). Modules keep their own detailed error
//! types and map into this one.
use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The thing asked for does not exist (a storage, a run, an object).
    #[error("{0}")]
    NotFound(String),
    /// The input is wrong; `field` names the offending field when there is one.
    #[error("{message}")]
    Invalid {
        code: &'static str,
        message: String,
        field: Option<&'static str>,
    },
    /// Credentials or permissions refused; retrying will not help.
    #[error("{0}")]
    PermissionDenied(String),
    /// A passing failure (network, a restarting server): retry with backoff.
    #[error("{0}")]
    Transient(String),
    /// Anything else; a bug or an unexpected state.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(
        code: &'static str,
        field: Option<&'static str>,
        message: impl fmt::Display,
    ) -> Self {
        Error::Invalid {
            code,
            message: message.to_string(),
            field,
        }
    }

    /// Whether a job that hit this error should be tried again later.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Transient(_))
    }
}

impl From<sea_orm::DbErr> for Error {
    fn from(err: sea_orm::DbErr) -> Self {
        use sea_orm::DbErr;
        match err {
            // A lost or refused connection is worth retrying; a bad query is not.
            DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => {
                Error::Transient(format!("database: {err}"))
            }
            DbErr::RecordNotFound(what) => Error::NotFound(what),
            other => Error::Internal(format!("database: {other}")),
        }
    }
}
