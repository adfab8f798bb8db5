//! Join and client tokens: their hashes, expiry, revocation and last use.
//! The secrets themselves never reach the database.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;

use super::schema::{from_sql, now_ms, to_sql};
use super::{Store, StoreError};

/// What a token lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// Joins workers to the grid (QUIC).
    Worker,
    /// Calls the REST API.
    Client,
}

impl TokenKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Worker => "worker",
            TokenKind::Client => "client",
        }
    }
}

impl std::str::FromStr for TokenKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "worker" | "join" => Ok(TokenKind::Worker),
            "client" | "rest" => Ok(TokenKind::Client),
            other => Err(format!("unknown token kind {other:?}: worker or client")),
        }
    }
}

/// What a client token may do through the REST API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// Everything: tokens, draining workers, cancelling any job.
    Admin,
    /// Submit jobs and cancel its own; read all but the tokens.
    User,
    /// Read jobs, results and workers; change nothing.
    Read,
}

impl TokenRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Admin => "admin",
            TokenRole::User => "user",
            TokenRole::Read => "read",
        }
    }
}

impl std::str::FromStr for TokenRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(TokenRole::Admin),
            "user" => Ok(TokenRole::User),
            "read" => Ok(TokenRole::Read),
            other => Err(format!("unknown token role {other:?}: admin, user or read")),
        }
    }
}

/// A token as listed: everything but its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TokenRow {
    pub id: u64,
    pub kind: TokenKind,
    /// A client token's role; none for a join token.
    pub role: Option<TokenRole>,
    pub name: String,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
    pub last_used_ms: Option<u64>,
}

const COLUMNS: &str =
    "id, kind, name, created_at_ms, expires_at_ms, revoked_at_ms, last_used_ms, hash, role";

fn token_row(row: &Row<'_>) -> rusqlite::Result<(TokenRow, Vec<u8>)> {
    let kind = if row.get::<_, String>(1)? == "client" {
        TokenKind::Client
    } else {
        TokenKind::Worker
    };
    // A role this foreman does not know (a newer one's) grants least.
    let role = (kind == TokenKind::Client)
        .then(|| row.get::<_, String>(8))
        .transpose()?
        .map(|role| role.parse().unwrap_or(TokenRole::Read));
    Ok((
        TokenRow {
            id: from_sql(row.get(0)?),
            kind,
            role,
            name: row.get(2)?,
            created_at_ms: from_sql(row.get(3)?),
            expires_at_ms: row.get::<_, Option<i64>>(4)?.map(from_sql),
            revoked_at_ms: row.get::<_, Option<i64>>(5)?.map(from_sql),
            last_used_ms: row.get::<_, Option<i64>>(6)?.map(from_sql),
        },
        row.get(7)?,
    ))
}

fn select(conn: &Connection, id: Option<u64>) -> Result<Vec<(TokenRow, Vec<u8>)>, StoreError> {
    let (sql, args) = match id {
        Some(id) => (
            format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"),
            vec![to_sql(id)],
        ),
        None => (format!("SELECT {COLUMNS} FROM tokens ORDER BY id"), vec![]),
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), token_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

impl Store {
    /// Stores a new token by the sha256 of its secret; durable when it returns.
    /// `role` is a client token's (a join token's is ignored).
    pub fn create_token(
        &self,
        kind: TokenKind,
        role: TokenRole,
        name: &str,
        hash: [u8; 32],
        expires_at_ms: Option<u64>,
    ) -> Result<TokenRow, StoreError> {
        let name = name.to_owned();
        self.call(true, move |conn| {
            let id: i64 = conn.query_row(
                "INSERT INTO tokens (kind, name, hash, created_at_ms, expires_at_ms, role)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                params![
                    kind.as_str(),
                    name,
                    &hash[..],
                    now_ms(),
                    expires_at_ms.map(to_sql),
                    role.as_str(),
                ],
                |row| row.get(0),
            )?;
            select(conn, Some(from_sql(id)))?
                .pop()
                .map(|(row, _)| row)
                .ok_or_else(|| StoreError::Corrupt(format!("token {id} vanished")))
        })
    }

    /// Every token, oldest first (no secrets: the store has none).
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.read(|conn| Ok(select(conn, None)?.into_iter().map(|(r, _)| r).collect()))
    }

    /// One token and the sha256 of its secret, to check a presented secret against.
    pub fn token_with_hash(&self, id: u64) -> Result<Option<(TokenRow, Vec<u8>)>, StoreError> {
        self.read(|conn| Ok(select(conn, Some(id))?.pop()))
    }

    /// Revokes a token (a second revoke keeps the first time); `None` when unknown.
    /// Durable when it returns.
    pub fn revoke_token(&self, id: u64) -> Result<Option<TokenRow>, StoreError> {
        self.call(true, move |conn| {
            conn.execute(
                "UPDATE tokens SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
                params![to_sql(id), now_ms()],
            )?;
            Ok(select(conn, Some(id))?.pop().map(|(row, _)| row))
        })
    }

    /// Records a token's use at `at_ms`; queued, returns at once.
    pub fn token_used(&self, id: u64, at_ms: u64) {
        self.exec_later(move |conn| {
            conn.execute(
                "UPDATE tokens SET last_used_ms = ?2 WHERE id = ?1",
                params![to_sql(id), to_sql(at_ms)],
            )?;
            Ok(())
        });
    }

    /// The client token that submitted a job (`None` before tokens, or unknown job).
    pub fn job_token(&self, job: u64) -> Result<Option<u64>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT token_id FROM jobs WHERE id = ?1",
                    [to_sql(job)],
                    |row| row.get::<_, Option<i64>>(0),
                )
                .optional()?
                .flatten()
                .map(from_sql))
        })
    }

    /// The join token a worker last joined with.
    pub fn worker_token(&self, worker: u64) -> Result<Option<u64>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    "SELECT token_id FROM workers WHERE id = ?1",
                    [to_sql(worker)],
                    |row| row.get::<_, Option<i64>>(0),
                )
                .optional()?
                .flatten()
                .map(from_sql))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn tokens_are_stored_as_hashes_listed_revoked_once_and_expire() {
        use crate::tokens::Tokens;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("foreman.db")).unwrap();
        let tokens = Tokens::new(store.clone());
        let join = tokens.issue(TokenKind::Worker, "w", None).unwrap();
        let client = tokens
            .issue_client(TokenRole::Read, "c", Some(4_000_000_000_000))
            .unwrap();
        let listed = store.tokens().unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|t| (t.id, t.kind, t.role, t.name.as_str(), t.expires_at_ms))
                .collect::<Vec<_>>(),
            vec![
                (join.row.id, TokenKind::Worker, None, "w", None),
                (
                    client.row.id,
                    TokenKind::Client,
                    Some(TokenRole::Read),
                    "c",
                    Some(4_000_000_000_000)
                ),
            ]
        );
        let first = store.revoke_token(join.row.id).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let again = store.revoke_token(join.row.id).unwrap().unwrap();
        assert_eq!(first.revoked_at_ms, again.revoked_at_ms);
        assert!(store.revoke_token(999).unwrap().is_none());

        store.token_used(client.row.id, 1234);
        store.flush().unwrap();
        let used = store.token_with_hash(client.row.id).unwrap().unwrap();
        assert_eq!(used.0.last_used_ms, Some(1234));
        assert_eq!(used.1.len(), 32);

        // Only hashes: no secret is anywhere in the database file.
        drop((tokens, store));
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        for issued in [&join, &client] {
            let secret = crate::tokens::parse(&issued.token).unwrap().2;
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
    }
}
