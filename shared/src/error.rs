//! The crate-wide error: few variants, each telling the caller what to do
//! (fix the input, retry later, give up). Modules keep their own detailed error
//! types and map into this one.
use std::fmt;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The crate error. Its variant, not its text, tells the caller what to do:
/// `Invalid` is the caller's mistake (an API 4xx; a run fails at once),
/// `Transient` is worth retrying, `NotFound`, `Unauthenticated` and
/// `PermissionDenied` will not change by retrying, `Internal` is a bug or an
/// unexpected state. Messages are fit for the API and run records, except
/// those of database errors, which [`Error::is_database`] tells apart.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The thing was changed by someone else since it was read: read it
    /// again and decide again.
    #[error("{0}")]
    Conflict(String),
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

    /// Whether this error came from the database driver (its message is the
    /// driver's own text, see [`DATABASE`]).
    pub fn is_database(&self) -> bool {
        matches!(self, Error::Transient(m) | Error::Internal(m) if m.starts_with(DATABASE))
    }
}

/// The prefix of every message made from a database error: the driver's
/// own text follows, fit for logs and run records, not for API callers.
const DATABASE: &str = "database: ";

impl From<sea_orm::DbErr> for Error {
    fn from(err: sea_orm::DbErr) -> Self {
        use sea_orm::DbErr;
        match err {
            // A lost or refused connection is worth retrying; a bad query is not.
            DbErr::Conn(_) | DbErr::ConnectionAcquire(_) => {
                Error::Transient(format!("{DATABASE}{err}"))
            }
            DbErr::RecordNotFound(what) => Error::NotFound(what),
            // An update by id that found no row: it was deleted meanwhile.
            DbErr::RecordNotUpdated => {
                Error::NotFound("it was deleted by another request meanwhile".into())
            }
            ref other => match classify(other) {
                DbClass::Transient => Error::Transient(format!("{DATABASE}{other}")),
                DbClass::BadValue { code, message } => {
                    // The driver's text names the value; the caller gets ours.
                    tracing::debug!(error = %other, "the database refused a value");
                    Error::invalid(code, None, message)
                }
                DbClass::Gone => {
                    tracing::debug!(error = %other, "a row referred to is gone");
                    Error::NotFound(
                        "what this refers to was deleted by another request meanwhile".into(),
                    )
                }
                DbClass::Other => Error::Internal(format!("{DATABASE}{other}")),
            },
        }
    }
}

enum DbClass {
    /// Says nothing about the statement: trying again later is the answer.
    Transient,
    /// The statement's data was refused: bad input, not worth retrying.
    BadValue {
        code: &'static str,
        message: &'static str,
    },
    /// A foreign key named a row that is gone: deleted while the statement
    /// was on its way (what it names was checked before).
    Gone,
    Other,
}

/// Sorts a statement's failure by the database's own error code, read the
/// way that database defines it: Postgres SQLSTATEs are five characters
/// (`22021` is a NUL in text, not a number), SQLite's are numbers whose low
/// byte is the primary code (5 BUSY, 6 LOCKED; 517 is BUSY_SNAPSHOT).
fn classify(err: &sea_orm::DbErr) -> DbClass {
    use sea_orm::{
        DbErr, RuntimeErr,
        sqlx::{self, postgres::PgDatabaseError, sqlite::SqliteError},
    };
    let (DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e))) = err
    else {
        return DbClass::Other;
    };
    match &**e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => DbClass::Transient,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if db.try_downcast_ref::<PgDatabaseError>().is_some() {
                postgres_class(&code)
            } else if db.try_downcast_ref::<SqliteError>().is_some() {
                sqlite_class(code.parse().unwrap_or(-1))
            } else {
                DbClass::Other
            }
        }
        _ => DbClass::Other,
    }
}

/// Postgres: connection exceptions (class 08), serialization failure,
/// deadlock, admin / crash shutdown and "cannot connect now" are transient,
/// and so is what a database in trouble answers for a while: insufficient
/// resources (class 53: too many connections, disk full, out of memory),
/// a write on a primary demoted to read-only by a failover (25006), a lock
/// or statement timeout or a cancelled statement (55P03, 57014), an I/O
/// error (58030); the run's attempt limit still ends a run that meets them
/// every time. Data exceptions (class 22) are bad values.
fn postgres_class(sqlstate: &str) -> DbClass {
    match sqlstate {
        s if s.starts_with("08") || s.starts_with("53") => DbClass::Transient,
        "40001" | "40P01" | "57P01" | "57P02" | "57P03" => DbClass::Transient,
        "25006" | "55P03" | "57014" | "58030" => DbClass::Transient,
        // 22021: a NUL byte in text; 22P05: `\u0000` in jsonb.
        "22021" | "22P05" => DbClass::BadValue {
            code: "invalid_text",
            message: "a text or JSON value holds the NUL character (\\u0000), which cannot be stored; remove it",
        },
        "23503" => DbClass::Gone,
        s if s.starts_with("22") => DbClass::BadValue {
            code: "invalid_value",
            message: "a value is too long, out of range or malformed for the database",
        },
        _ => DbClass::Other,
    }
}

/// SQLite: BUSY (5) and LOCKED (6), with their extended codes, are
/// transient; TOOBIG (18) is a bad value; a foreign key's failure (787) is
/// a row gone.
fn sqlite_class(code: i64) -> DbClass {
    if code == 787 {
        return DbClass::Gone; // SQLITE_CONSTRAINT_FOREIGNKEY
    }
    match code & 0xff {
        5 | 6 => DbClass::Transient,
        18 => DbClass::BadValue {
            code: "invalid_value",
            message: "a value is too large for the database",
        },
        _ => DbClass::Other,
    }
}

/// The most characters of an object's error that is kept.
pub const MAX_MESSAGE_CHARS: usize = 2_000;

/// `message` as an object's error is stored: NUL characters, which
/// Postgres refuses in text, written `\0`, and cut to
/// [`MAX_MESSAGE_CHARS`] characters (a library's message can quote a whole
/// value, or a column name a file chose).
pub fn storable(message: &str) -> String {
    let escaped = message.replace('\0', "\\0");
    let mut out: String = escaped.chars().take(MAX_MESSAGE_CHARS).collect();
    if escaped.chars().nth(MAX_MESSAGE_CHARS).is_some() {
        out.push_str(" [...]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient(class: DbClass) -> bool {
        matches!(class, DbClass::Transient)
    }

    #[test]
    fn an_update_that_found_no_row_is_not_found() {
        let err = Error::from(sea_orm::DbErr::RecordNotUpdated);
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
        assert!(matches!(postgres_class("23503"), DbClass::Gone));
        assert!(matches!(sqlite_class(787), DbClass::Gone));
        assert!(matches!(sqlite_class(2067), DbClass::Other)); // UNIQUE
    }

    #[test]
    fn stored_messages_hold_no_nul_and_are_cut() {
        assert_eq!(storable("column a\0b"), "column a\\0b");
        let long = storable(&"é".repeat(MAX_MESSAGE_CHARS + 1));
        assert_eq!(long.chars().count(), MAX_MESSAGE_CHARS + " [...]".len());
        assert_eq!(storable("short"), "short");
    }

    #[test]
    fn postgres_codes_are_not_read_as_sqlite_numbers() {
        // 22021 = 0x5605: its low byte is SQLite's BUSY.
        assert!(!transient(postgres_class("22021")));
        assert!(matches!(
            postgres_class("22021"),
            DbClass::BadValue {
                code: "invalid_text",
                ..
            }
        ));
        for code in [
            "08006", "08001", "40001", "40P01", "57P01", "57P03", "25006", "53300", "53100",
            "53200", "55P03", "57014", "58030",
        ] {
            assert!(transient(postgres_class(code)), "{code}");
        }
        for code in ["42P01", "23505", "23503", "XX000", "00005"] {
            assert!(!transient(postgres_class(code)), "{code}");
        }
    }

    #[test]
    fn sqlite_busy_and_locked_are_transient_with_their_extended_codes() {
        for code in [5, 6, 261, 517, 262] {
            assert!(transient(sqlite_class(code)), "{code}");
        }
        for code in [1, 19, 787, 2067, 11] {
            assert!(!transient(sqlite_class(code)), "{code}");
        }
    }
}
