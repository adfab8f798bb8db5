//! Modules by content: the sha256 of the wasm names a validated,
//! pre-instantiated task, kept in memory and, precompiled, on disk.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::Engine;

use wasmgrid_protocol::{CacheSource, Failure, FailureKind};

use super::bindings::TaskPre;
use super::preempt::GuestCode;
use super::sandbox::Sandbox;

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
    /// Names artifacts compatible with this engine build and configuration.
    compat: String,
    loaded: Mutex<HashMap<ModuleId, Arc<PreparedTask>>>,
}

impl ModuleCache {
    pub fn new(engine: Engine, linker: Linker<Sandbox>, dir: Option<PathBuf>) -> Self {
        let compat = compatibility_key(&engine);
        ModuleCache {
            engine,
            linker,
            dir,
            compat,
            loaded: Mutex::default(),
        }
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
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let task = loaded.entry(id).or_insert(task).clone();
        Ok((task, source))
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
        let task = Arc::new(self.prepare(id, &component).ok()?);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        Some((loaded.entry(id).or_insert(task).clone(), CacheSource::Disk))
    }

    /// Names the engine build and settings compiled artifacts are valid for.
    pub fn compatibility(&self) -> &str {
        &self.compat
    }

    /// A task already loaded in this process.
    pub fn get(&self, id: &ModuleId) -> Option<Arc<PreparedTask>> {
        let loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        loaded.get(id).cloned()
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
                Ok(component) => return Ok((component, CacheSource::Disk)),
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
            if let Err(error) = store_artifact(&path, &component) {
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

fn store_artifact(path: &Path, component: &Component) -> anyhow::Result<()> {
    let bytes = component.serialize()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Write then rename, so a crash never leaves a half-written artifact under the real name.
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)?;
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
    fn module_id_is_sha256() {
        assert_eq!(
            ModuleId::of(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
