//! Compiled modules on disk: written whole or not at all, marked when used,
//! and the least recently used deleted once they outgrow their cap.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use wasmtime::component::Component;

/// What the disk cache may hold unless told otherwise (`worker --cache-max-mib`).
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

const EXTENSION: &str = "cwasm";

/// Writes `component`'s artifact to `path`, then deletes the least recently
/// used others in its directory past `max_bytes`.
pub(super) fn store(path: &Path, component: &Component, max_bytes: u64) -> anyhow::Result<()> {
    let bytes = component.serialize()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // Write then rename, so a crash never leaves a half-written artifact under the real name.
    let partial = path.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)?;
    let deleted = evict(dir, max_bytes, path)?;
    if deleted > 0 {
        tracing::info!(
            dir = %dir.display(),
            deleted,
            max_mib = max_bytes >> 20,
            "deleted the least recently used compiled modules"
        );
    }
    Ok(())
}

/// Marks an artifact as just used, so eviction keeps it longest. Best effort:
/// a read-only cache still serves.
pub(super) fn touch(path: &Path) {
    let touched = std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|file| file.set_modified(SystemTime::now()));
    if let Err(error) = touched {
        tracing::debug!(path = %path.display(), "could not mark a compiled module used: {error}");
    }
}

/// Deletes the least recently used artifacts in `dir` until those left take
/// at most `max_bytes`, never `keep`; returns how many it deleted. Another
/// process sharing the directory may lose an artifact it was about to read:
/// it compiles or fetches the module again.
pub(super) fn evict(dir: &Path, max_bytes: u64, keep: &Path) -> std::io::Result<usize> {
    let mut artifacts: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
            continue;
        }
        // Gone meanwhile (another worker evicted it): nothing to count.
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        let used = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        artifacts.push((used, metadata.len(), path));
    }
    let mut total: u64 = artifacts.iter().map(|(_, size, _)| size).sum();
    artifacts.sort();
    let mut deleted = 0;
    for (_, size, path) in artifacts {
        if total <= max_bytes {
            break;
        }
        if path == keep {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            deleted += 1;
        }
        total = total.saturating_sub(size);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn artifact(dir: &Path, name: &str, size: usize, age_secs: u64) -> PathBuf {
        let path = dir.join(format!("{name}.{EXTENSION}"));
        std::fs::write(&path, vec![0u8; size]).unwrap();
        let used = SystemTime::now() - Duration::from_secs(age_secs);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(used)
            .unwrap();
        path
    }

    #[test]
    fn the_least_recently_used_go_first_until_the_rest_fit() {
        let dir = tempfile::tempdir().unwrap();
        let oldest = artifact(dir.path(), "a", 400, 300);
        let older = artifact(dir.path(), "b", 400, 200);
        let newer = artifact(dir.path(), "c", 400, 100);
        let kept = artifact(dir.path(), "d", 400, 400);
        std::fs::write(dir.path().join("notes.txt"), vec![0u8; 5000]).unwrap();

        // Within the cap: nothing goes.
        assert_eq!(evict(dir.path(), 1600, &kept).unwrap(), 0);
        // Over it: the oldest go, but never the one to keep, however old.
        assert_eq!(evict(dir.path(), 900, &kept).unwrap(), 2);
        assert!(!oldest.exists() && !older.exists());
        assert!(newer.exists() && kept.exists());
        assert!(dir.path().join("notes.txt").exists());

        // Used now, the older one outlives a newer one.
        touch(&kept);
        assert_eq!(evict(dir.path(), 400, &dir.path().join("none")).unwrap(), 1);
        assert!(kept.exists() && !newer.exists());
    }
}
