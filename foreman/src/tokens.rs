//! The token authority: issues join (`wgw_ID_SECRET`) and client
//! (`wgc_ID_SECRET`) tokens, checks presented ones against their stored
//! hashes, revokes them, and cuts off the workers that joined with a token
//! when it is revoked.
//!
//! The id in the string makes lookup one row; the secret is 128 random bits,
//! compared by its sha256 in constant time. A join token travels with the
//! foreman's certificate fingerprint (`wgw_ID_SECRET:FINGERPRINT`) so a
//! worker gets both in one string; only the part before `:` is a secret.

use std::collections::HashMap;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::net::close;
use crate::store::{Store, StoreError, TokenKind, TokenRole, TokenRow};

/// `last_used_ms` is written at most this often per token.
const USE_RECORD_INTERVAL_MS: u64 = 5_000;

/// Why a presented token is refused; the message goes to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("invalid {0} token")]
    Invalid(&'static str),
    #[error("{what} token {id} expired at {at}")]
    Expired {
        what: &'static str,
        id: u64,
        at: String,
    },
    #[error("{what} token {id} was revoked")]
    Revoked { what: &'static str, id: u64 },
    #[error("token {id} is a {actual} token, not a {what} token")]
    WrongKind {
        what: &'static str,
        id: u64,
        actual: &'static str,
    },
}

/// What a kind is called in messages.
pub fn what(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Worker => "join",
        TokenKind::Client => "client",
    }
}

fn prefix(kind: TokenKind) -> &'static str {
    match kind {
        TokenKind::Worker => "wgw",
        TokenKind::Client => "wgc",
    }
}

/// A freshly made token: its row and the string to hand out (shown once).
#[derive(Debug, Clone)]
pub struct Issued {
    pub row: TokenRow,
    /// `wgw_ID_SECRET` or `wgc_ID_SECRET` (a join token's fingerprint is added by the caller).
    pub token: String,
}

/// Splits `wgX_ID_SECRET[:FINGERPRINT]` into its kind, id and secret.
pub fn parse(token: &str) -> Option<(TokenKind, u64, &str)> {
    let token = token.trim();
    let token = token.split_once(':').map_or(token, |(secret, _)| secret);
    let mut parts = token.splitn(3, '_');
    let kind = match parts.next()? {
        "wgw" => TokenKind::Worker,
        "wgc" => TokenKind::Client,
        _ => return None,
    };
    let id = parts.next()?.parse().ok()?;
    let secret = parts.next()?;
    Some((kind, id, secret))
}

fn hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Equal or not, in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn now_ms() -> u64 {
    crate::driver::unix_ms()
}

/// Unix milliseconds as RFC 3339 UTC, to the second.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// Issues, checks and revokes tokens; shared by the QUIC and REST sides.
pub struct Tokens {
    store: Store,
    /// Live worker connections by the join token they came with.
    joined: Mutex<HashMap<u64, Vec<quinn::Connection>>>,
    /// When each token's use was last written, to write it seldom.
    used: Mutex<HashMap<u64, u64>>,
    /// Rows already read, with their stored hashes: a token is checked once
    /// against SQLite, then in memory. Only [`Tokens::revoke`] changes a row,
    /// and it updates this too.
    known: Mutex<HashMap<u64, (TokenRow, Vec<u8>)>>,
}

impl Tokens {
    pub fn new(store: Store) -> Self {
        Tokens {
            store,
            joined: Mutex::default(),
            used: Mutex::default(),
            known: Mutex::default(),
        }
    }

    /// Makes a token (a client token with the `admin` role); the returned
    /// string is the only copy of its secret.
    pub fn issue(
        &self,
        kind: TokenKind,
        name: &str,
        expires_at_ms: Option<u64>,
    ) -> Result<Issued, StoreError> {
        self.issue_with(kind, TokenRole::Admin, name, expires_at_ms)
    }

    /// Makes a client token with `role` (see [`Tokens::issue`]).
    pub fn issue_client(
        &self,
        role: TokenRole,
        name: &str,
        expires_at_ms: Option<u64>,
    ) -> Result<Issued, StoreError> {
        self.issue_with(TokenKind::Client, role, name, expires_at_ms)
    }

    fn issue_with(
        &self,
        kind: TokenKind,
        role: TokenRole,
        name: &str,
        expires_at_ms: Option<u64>,
    ) -> Result<Issued, StoreError> {
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let row = self
            .store
            .create_token(kind, role, name, hash(&secret), expires_at_ms)?;
        let token = format!("{}_{}_{secret}", prefix(kind), row.id);
        Ok(Issued { row, token })
    }

    pub fn list(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.store.tokens()
    }

    /// Checks a presented token for `kind`; `Ok(Err(..))` says why it is refused.
    pub fn check(
        &self,
        presented: &str,
        kind: TokenKind,
    ) -> Result<Result<TokenRow, Refusal>, StoreError> {
        if let Some(checked) = self.check_known(presented, kind) {
            return Ok(checked);
        }
        if let Some((_, id, _)) = parse(presented) {
            if let Some(found) = self.store.token_with_hash(id)? {
                self.known_rows().insert(id, found);
            }
        }
        Ok(self
            .check_known(presented, kind)
            .unwrap_or(Err(Refusal::Invalid(what(kind)))))
    }

    /// [`Tokens::check`] without the store: `None` when the token's row
    /// has not been read yet (or the string names no token at all).
    pub fn check_known(
        &self,
        presented: &str,
        kind: TokenKind,
    ) -> Option<Result<TokenRow, Refusal>> {
        let what = what(kind);
        let Some((claimed, id, secret)) = parse(presented) else {
            return Some(Err(Refusal::Invalid(what)));
        };
        let row = {
            let known = self.known_rows();
            let (row, stored) = known.get(&id)?;
            if !same(&hash(secret), stored) {
                return Some(Err(Refusal::Invalid(what)));
            }
            row.clone()
        };
        // A prefix that disagrees with the stored kind is a doctored string.
        if claimed != row.kind {
            return Some(Err(Refusal::Invalid(what)));
        }
        if row.kind != kind {
            return Some(Err(Refusal::WrongKind {
                what,
                id,
                actual: self::what(row.kind),
            }));
        }
        if row.revoked_at_ms.is_some() {
            return Some(Err(Refusal::Revoked { what, id }));
        }
        let now = now_ms();
        if let Some(at) = row.expires_at_ms.filter(|&at| at <= now) {
            return Some(Err(Refusal::Expired {
                what,
                id,
                at: rfc3339(at),
            }));
        }
        self.record_use(id, now);
        Some(Ok(row))
    }

    fn known_rows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (TokenRow, Vec<u8>)>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_use(&self, id: u64, now: u64) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let last = used.entry(id).or_insert(0);
        if now.saturating_sub(*last) >= USE_RECORD_INTERVAL_MS {
            *last = now;
            self.store.token_used(id, now);
        }
    }

    /// Revokes a token and closes the connections of workers that joined
    /// with it; `None` when there is no such token.
    pub fn revoke(&self, id: u64) -> Result<Option<TokenRow>, StoreError> {
        let Some(row) = self.store.revoke_token(id)? else {
            return Ok(None);
        };
        if let Some((known, _)) = self.known_rows().get_mut(&id) {
            *known = row.clone();
        }
        let connections = self
            .joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .unwrap_or_default();
        let reason = Refusal::Revoked {
            what: what(row.kind),
            id,
        }
        .to_string();
        for connection in &connections {
            connection.close(close::BAD_TOKEN.into(), reason.as_bytes());
        }
        if !connections.is_empty() {
            tracing::info!(
                token = id,
                workers = connections.len(),
                "token revoked: its workers are disconnected"
            );
        }
        Ok(Some(row))
    }

    /// Remembers a worker's connection under its join token, until the guard drops.
    pub fn hold(&self, token: u64, connection: quinn::Connection) -> Held<'_> {
        let stable = connection.stable_id();
        self.joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(token)
            .or_default()
            .push(connection);
        Held {
            tokens: self,
            token,
            stable,
        }
    }
}

/// A connection registered with [`Tokens::hold`]; forgotten on drop.
pub struct Held<'a> {
    tokens: &'a Tokens,
    token: u64,
    stable: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut joined = self.tokens.joined.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = joined.get_mut(&self.token) {
            list.retain(|c| c.stable_id() != self.stable);
            if list.is_empty() {
                joined.remove(&self.token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_strings_carry_kind_id_and_secret() {
        assert_eq!(
            parse("wgw_12_abcd:ff00"),
            Some((TokenKind::Worker, 12, "abcd"))
        );
        assert_eq!(parse("wgc_3_x_y"), Some((TokenKind::Client, 3, "x_y")));
        for bad in ["", "abcd:ff", "wgx_1_a", "wgw_a_b", "wgw_1"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }

    #[test]
    fn issued_tokens_are_checked_by_kind_expiry_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("foreman.db")).unwrap();
        let tokens = Tokens::new(store.clone());
        let join = tokens.issue(TokenKind::Worker, "w", None).unwrap();
        let client = tokens.issue(TokenKind::Client, "c", None).unwrap();
        assert!(join.token.starts_with(&format!("wgw_{}_", join.row.id)));
        // 128 bits of secret, as hex.
        assert_eq!(parse(&join.token).unwrap().2.len(), 32);

        let ok = |t: &str, k| tokens.check(t, k).unwrap();
        assert_eq!(ok(&join.token, TokenKind::Worker).unwrap().id, join.row.id);
        assert_eq!(
            ok(&format!("{}:abcdef", join.token), TokenKind::Worker)
                .unwrap()
                .id,
            join.row.id
        );
        assert_eq!(
            ok(&client.token, TokenKind::Worker)
                .unwrap_err()
                .to_string(),
            format!(
                "token {} is a client token, not a join token",
                client.row.id
            )
        );
        let mut wrong = join.token.clone();
        wrong.pop();
        wrong.push('x');
        assert_eq!(
            ok(&wrong, TokenKind::Worker).unwrap_err(),
            Refusal::Invalid("join")
        );
        assert_eq!(
            ok("wgw_999_00", TokenKind::Worker).unwrap_err(),
            Refusal::Invalid("join")
        );
        let relabelled = join.token.replacen("wgw_", "wgc_", 1);
        assert_eq!(
            ok(&relabelled, TokenKind::Client).unwrap_err(),
            Refusal::Invalid("client")
        );

        let old = tokens
            .issue(TokenKind::Client, "old", Some(now_ms() - 1))
            .unwrap();
        let refused = ok(&old.token, TokenKind::Client).unwrap_err().to_string();
        assert!(
            refused.starts_with(&format!("client token {} expired at 20", old.row.id)),
            "{refused}"
        );

        let revoked = tokens.revoke(client.row.id).unwrap().unwrap();
        assert!(revoked.revoked_at_ms.is_some());
        assert_eq!(
            ok(&client.token, TokenKind::Client)
                .unwrap_err()
                .to_string(),
            format!("client token {} was revoked", client.row.id)
        );
        assert!(tokens.revoke(4242).unwrap().is_none());
    }
}
