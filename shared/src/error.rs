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
    /// The credentials themselves were refused (wrong key, bad signature,
    /// expired token); retrying will not help.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credentials were accepted but lack a permission; retrying will not help.
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
            ref other if is_transient_db(other) => Error::Transient(format!("database: {other}")),
            other => Error::Internal(format!("database: {other}")),
        }
    }
}

/// Failures of a statement that say nothing about the statement: the server
/// restarted, a connection broke, a deadlock or serialization conflict, a
/// busy SQLite file. Trying again later is the right answer to all of them.
fn is_transient_db(err: &sea_orm::DbErr) -> bool {
    use sea_orm::{DbErr, RuntimeErr, sqlx};
    let (DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))) = err
    else {
        return false;
    };
    match &**e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Postgres: connection exceptions (08xxx), serialization failure,
            // deadlock, admin/crash shutdown, cannot connect now.
            // SQLite: BUSY (5), LOCKED (6) and their extended codes (517, ...).
            code.starts_with("08")
                || ["40001", "40P01", "57P01", "57P02", "57P03"].contains(&code.as_ref())
                || code.parse::<i64>().is_ok_and(|c| matches!(c & 0xff, 5 | 6))
        }
        _ => false,
    }
}
