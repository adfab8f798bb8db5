//! Stored modules: storing one by its hash, knowing which are stored, and
//! deleting those that no job names any more.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use wasmgrid_protocol::wire::ModuleHash;

use super::schema::now_ms;
use super::{Store, StoreError};

/// How long a module named by an upload or an accepted job is kept although
/// no stored job names it: far longer than a job takes from being accepted
/// to being committed, so its insert never finds the module gone.
pub const MODULE_GRACE: Duration = Duration::from_secs(60);

/// When each module known to be stored was last named.
type Named = HashMap<ModuleHash, Instant>;

/// The modules known to be stored, each with when it was last named. Naming
/// and deleting take the one lock, so neither falls between the other's
/// check and act.
#[derive(Debug, Default)]
pub(super) struct ModuleUses(Mutex<Named>);

impl ModuleUses {
    fn lock(&self) -> MutexGuard<'_, Named> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store {
    /// Stores a module once by its sha256 (the caller computed it). Durable
    /// when it returns.
    pub fn put_module(&self, hash: &ModuleHash, wasm: &[u8]) -> Result<(), StoreError> {
        let hash = *hash;
        let wasm = wasm.to_vec();
        let uses = self.inner.module_uses.clone();
        // WAL with synchronous=NORMAL survives a crash of the process (not of
        // the machine's power) without an fsync per accepted job.
        self.call(false, move |conn| {
            insert(conn, &hash, &wasm)?;
            // Named in the same step of the writer as stored: no deletion
            // (also the writer's) can come between.
            uses.lock().insert(hash, Instant::now());
            Ok(())
        })
    }

    pub fn module(&self, hash: &ModuleHash) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT wasm FROM modules WHERE hash = ?1")?
                .query_row([&hash[..]], |row| row.get(0))
                .optional()?)
        })
    }

    /// Whether the module is known to be stored, without reading the
    /// database; if so it counts as named now.
    pub fn name_module_if_known(&self, hash: &ModuleHash) -> bool {
        match self.inner.module_uses.lock().get_mut(hash) {
            Some(named) => {
                *named = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Whether the module is stored; if so it counts as named now, so it
    /// stays for [`MODULE_GRACE`] at least.
    pub(super) fn name_module(&self, hash: &ModuleHash) -> Result<bool, StoreError> {
        // Held across the read: a deletion cannot fall between finding the
        // module and naming it.
        let mut uses = self.inner.module_uses.lock();
        if let Some(named) = uses.get_mut(hash) {
            *named = Instant::now();
            return Ok(true);
        }
        let stored = self.read(|conn| {
            Ok(conn
                .prepare_cached("SELECT 1 FROM modules WHERE hash = ?1")?
                .query_row([&hash[..]], |_| Ok(()))
                .optional()?
                .is_some())
        })?;
        if stored {
            uses.insert(*hash, Instant::now());
        }
        Ok(stored)
    }

    /// Deletes the modules that no job names and that nothing named in the
    /// last `grace`; returns how many.
    pub fn delete_unused_modules(&self, grace: Duration) -> Result<u64, StoreError> {
        let uses = self.inner.module_uses.clone();
        self.call(false, move |conn| delete_unused(conn, &uses, grace))
    }
}

fn insert(conn: &Connection, hash: &ModuleHash, wasm: &[u8]) -> Result<(), StoreError> {
    let size = i64::try_from(wasm.len()).unwrap_or(i64::MAX);
    let added = conn.execute(
        "INSERT OR IGNORE INTO modules (hash, wasm, size, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
        params![&hash[..], wasm, size, now_ms()],
    )?;
    if added > 0 {
        tracing::info!(module = %hex::encode(hash), size, "module stored");
    }
    Ok(())
}

/// Deletes, in a transaction of its own, the modules no job names that were
/// not named within `grace`; returns how many. The lock is held until the
/// commit: a job accepted meanwhile either named its module first (which
/// keeps it) or finds it gone.
pub(super) fn delete_unused(
    conn: &mut Connection,
    uses: &ModuleUses,
    grace: Duration,
) -> Result<u64, StoreError> {
    let tx = conn.transaction()?;
    let mut named = uses.lock();
    let now = Instant::now();
    let unused = tx
        .prepare_cached(
            "SELECT hash, size FROM modules
             WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.module = modules.hash)",
        )?
        .query_map([], |row| {
            Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut deleted = Vec::new();
    for (hash, size) in unused {
        let Ok(hash) = ModuleHash::try_from(hash.as_slice()) else {
            continue;
        };
        let recent = named
            .get(&hash)
            .is_some_and(|at| now.saturating_duration_since(*at) < grace);
        if recent {
            continue;
        }
        tx.prepare_cached("DELETE FROM modules WHERE hash = ?1")?
            .execute([&hash[..]])?;
        tracing::info!(module = %hex::encode(hash), size, "module deleted: no job names it");
        deleted.push(hash);
    }
    tx.commit()?;
    for hash in &deleted {
        named.remove(hash);
    }
    Ok(deleted.len() as u64)
}
