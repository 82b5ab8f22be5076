//! Which errors of a statement leave its connection (and the locks on it) intact.

use sqlx::postgres::PgDatabaseError;
use sqlx::postgres::PgSeverity::{Fatal, Panic};

/// Errors after which the session is known to be intact: the statement failed on its own.
pub(super) fn is_statement_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(database) => {
            // A FATAL error (53200 at connection start, say) ends the server's session,
            // whatever its class.
            let fatal = database
                .try_downcast_ref::<PgDatabaseError>()
                .is_some_and(|error| matches!(error.severity(), Fatal | Panic));
            // syntax/undefined objects, data, integrity, object state, transaction rollback,
            // insufficient privilege, insufficient resources (53200: the server's lock table
            // is full), program limits, and a statement_timeout cancel.
            let classes = ["42", "22", "23", "55", "40", "53", "54"];
            !fatal
                && database.code().is_some_and(|code| {
                    classes.iter().any(|class| code.starts_with(class)) || code == "57014"
                })
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::RowNotFound
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnIndexOutOfBounds { .. } => true,
        _ => false,
    }
}
