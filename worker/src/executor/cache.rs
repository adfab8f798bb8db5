//! Modules by content: the sha256 of the wasm names a validated,
//! pre-instantiated task, kept in memory and, precompiled, on disk.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::Engine;

use wasmgrid_protocol::{CacheSource, Failure, FailureKind};

use super::artifacts;
use super::bindings::TaskPre;
use super::preempt::GuestCode;
use super::sandbox::Sandbox;

/// Modules kept compiled in memory; past that the least recently used is
/// dropped (a running task keeps its own) and comes back from disk if asked
/// again. Bounds a long-lived worker that sees many versions of a module.
const MAX_LOADED: usize = 16;

const WASM_MAGIC: &[u8; 4] = b"\0asm";
const CORE_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];

/// The sha256 of a module's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(pub [u8; 32]);

impl ModuleId {
    pub fn of(wasm: &[u8]) -> Self {
        ModuleId(Sha256::digest(wasm).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleId({})", self.to_hex())
    }
}

/// A module that passed validation and is ready to instantiate cheaply.
pub struct PreparedTask {
    pub id: ModuleId,
    pub(super) pre: TaskPre<Sandbox>,
    /// Where its compiled functions lie, for stopping it by signal.
    pub(super) code: GuestCode,
}

impl fmt::Debug for PreparedTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedTask")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

pub struct ModuleCache {
    engine: Engine,
    linker: Linker<Sandbox>,
    dir: Option<PathBuf>,
    /// What the artifacts in `dir` may take.
    max_disk_bytes: u64,
    /// Names artifacts compatible with this engine build and configuration.
    compat: String,
    loaded: Mutex<Loaded<PreparedTask>>,
}

/// What is loaded in memory, each with when it was last used.
struct Loaded<T> {
    tasks: HashMap<ModuleId, (Arc<T>, u64)>,
    uses: u64,
}

impl<T> Default for Loaded<T> {
    fn default() -> Self {
        Loaded {
            tasks: HashMap::new(),
            uses: 0,
        }
    }
}

impl<T> Loaded<T> {
    fn get(&mut self, id: &ModuleId) -> Option<Arc<T>> {
        self.uses += 1;
        let (task, used) = self.tasks.get_mut(id)?;
        *used = self.uses;
        Some(task.clone())
    }

    /// Keeps `task` (or the one another thread loaded first), dropping the
    /// least recently used past [`MAX_LOADED`].
    fn insert(&mut self, id: ModuleId, task: Arc<T>) -> Arc<T> {
        if let Some(loaded) = self.get(&id) {
            return loaded;
        }
        if self.tasks.len() >= MAX_LOADED {
            let oldest = self
                .tasks
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.tasks.remove(&oldest);
            }
        }
        self.tasks.insert(id, (task.clone(), self.uses));
        task
    }
}

impl ModuleCache {
    pub fn new(
        engine: Engine,
        linker: Linker<Sandbox>,
        dir: Option<PathBuf>,
        max_disk_bytes: u64,
    ) -> Self {
        let compat = compatibility_key(&engine);
        ModuleCache {
            engine,
            linker,
            dir,
            max_disk_bytes,
            compat,
            loaded: Mutex::default(),
        }
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, Loaded<PreparedTask>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The prepared task for `wasm`: from memory, from disk, or compiled now.
    pub fn load(&self, wasm: &[u8]) -> Result<(Arc<PreparedTask>, CacheSource), Failure> {
        let id = ModuleId::of(wasm);
        if let Some(task) = self.get(&id) {
            return Ok((task, CacheSource::Memory));
        }
        check_header(wasm)?;
        let (component, source) = self.component(id, wasm)?;
        let task = Arc::new(self.prepare(id, &component)?);
        Ok((self.loaded().insert(id, task), source))
    }

    /// A task by its sha256 alone: loaded in this process, or compiled by an
    /// earlier one into the disk cache (so a restarted worker need not fetch it).
    pub fn load_cached(&self, id: ModuleId) -> Option<(Arc<PreparedTask>, CacheSource)> {
        if let Some(task) = self.get(&id) {
            return Some((task, CacheSource::Memory));
        }
        let path = self.artifact_path(id).filter(|p| p.exists())?;
        // SAFETY: as in `component`: our own artifacts, named by content and engine.
        let component = unsafe { Component::deserialize_file(&self.engine, &path) }.ok()?;
        artifacts::touch(&path);
        let task = Arc::new(self.prepare(id, &component).ok()?);
        Some((self.loaded().insert(id, task), CacheSource::Disk))
    }

    /// Names the engine build and settings compiled artifacts are valid for.
    pub fn compatibility(&self) -> &str {
        &self.compat
    }

    /// A task already loaded in this process.
    pub fn get(&self, id: &ModuleId) -> Option<Arc<PreparedTask>> {
        self.loaded().get(id)
    }

    fn artifact_path(&self, id: ModuleId) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{id}-{}.cwasm", self.compat)))
    }

    fn component(&self, id: ModuleId, wasm: &[u8]) -> Result<(Component, CacheSource), Failure> {
        let artifact = self.artifact_path(id);
        if let Some(path) = artifact.as_deref().filter(|p| p.exists()) {
            // SAFETY: the cache directory holds only artifacts this engine
            // serialized, named by content and engine compatibility.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => {
                    artifacts::touch(path);
                    return Ok((component, CacheSource::Disk));
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), "unusable cached artifact, recompiling: {error:#}");
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let component = Component::new(&self.engine, wasm).map_err(|e| {
            Failure::new(
                FailureKind::InvalidModule,
                format!("the component does not compile: {e:#}"),
            )
        })?;
        if let Some(path) = artifact {
            if let Err(error) = artifacts::store(&path, &component, self.max_disk_bytes) {
                tracing::warn!(path = %path.display(), "could not cache compiled module: {error:#}");
            }
        }
        Ok((component, CacheSource::Compiled))
    }

    fn prepare(&self, id: ModuleId, component: &Component) -> Result<PreparedTask, Failure> {
        let instance_pre = self.linker.instantiate_pre(component).map_err(|e| {
            Failure::new(
                FailureKind::WrongWorld,
                format!(
                    "the component imports something the sandbox does not provide \
                     (tasks may import WASI 0.2 and wasmgrid:task/host only): {e:#}"
                ),
            )
        })?;
        let pre = TaskPre::new(instance_pre).map_err(|e| {
            Failure::new(
                FailureKind::WrongWorld,
                format!(
                    "the component is not a wasmgrid task: it must export \
                     `run: func(args: string) -> result<string, task-error>` \
                     (world wasmgrid:task/task@0.1.0): {e:#}"
                ),
            )
        })?;
        Ok(PreparedTask {
            id,
            pre,
            code: GuestCode::of(component),
        })
    }
}

/// Cheap checks that turn the most common mistakes into precise messages
/// before the compiler gives a generic one.
fn check_header(wasm: &[u8]) -> Result<(), Failure> {
    if wasm.len() < 8 || &wasm[..4] != WASM_MAGIC {
        return Err(Failure::new(
            FailureKind::InvalidModule,
            format!(
                "not a wasm binary: it does not start with the wasm magic bytes \\0asm ({} bytes)",
                wasm.len()
            ),
        ));
    }
    if wasm[4..8] == CORE_MODULE_VERSION {
        return Err(Failure::new(
            FailureKind::WrongWorld,
            "this is a core wasm module, not a component: build the task for \
             wasm32-wasip2 with the wasmgrid guest SDK (see guest-sdk/README.md)",
        ));
    }
    Ok(())
}

/// A stable name for the engine's artifact compatibility.
fn compatibility_key(engine: &Engine) -> String {
    struct Sha256Hasher(Sha256);
    impl Hasher for Sha256Hasher {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            0
        }
    }
    let mut hasher = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_wasm() {
        let err = check_header(b"hello world").unwrap_err();
        assert_eq!(err.kind, FailureKind::InvalidModule);
        assert!(err.message.contains("magic"), "{}", err.message);
    }

    #[test]
    fn a_core_module_is_the_wrong_world() {
        let err = check_header(b"\0asm\x01\0\0\0").unwrap_err();
        assert_eq!(err.kind, FailureKind::WrongWorld);
        assert!(err.message.contains("core wasm module"), "{}", err.message);
    }

    #[test]
    fn memory_keeps_the_most_recently_used_modules() {
        let mut loaded = Loaded::default();
        let id = |n: usize| ModuleId([n as u8; 32]);
        for n in 0..MAX_LOADED {
            loaded.insert(id(n), Arc::new(n));
        }
        // The first is used again, so the second is now the oldest.
        assert_eq!(loaded.get(&id(0)).as_deref(), Some(&0));
        // Loaded twice at once: both callers get the first one kept.
        assert_eq!(*loaded.insert(id(0), Arc::new(99)), 0);
        loaded.insert(id(MAX_LOADED), Arc::new(MAX_LOADED));
        assert_eq!(loaded.tasks.len(), MAX_LOADED);
        assert!(loaded.get(&id(1)).is_none());
        assert!(loaded.get(&id(0)).is_some() && loaded.get(&id(2)).is_some());
    }

    #[test]
    fn module_id_is_sha256() {
        assert_eq!(
            ModuleId::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
