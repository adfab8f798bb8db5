//! The foreman's identity in its data dir: a self-signed TLS certificate made
//! on first start (workers pin its sha256), its rotation, and the bootstrap
//! tokens (`join-token`, `client-token`) made on first start.

use std::path::Path;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use crate::store::TokenKind;
use crate::tokens::Tokens;

/// The name in the certificate; workers connect with it as the server name.
pub const SERVER_NAME: &str = "wasmgrid-foreman";

const CERT_FILE: &str = "foreman-cert.der";
const KEY_FILE: &str = "foreman-key.der";
/// The bootstrap join token with the current fingerprint: `wgw_ID_SECRET:FINGERPRINT`.
pub const JOIN_TOKEN_FILE: &str = "join-token";
/// The bootstrap client (admin) token for the REST API: `wgc_ID_SECRET`.
pub const CLIENT_TOKEN_FILE: &str = "client-token";

pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// sha256 of the certificate, lowercase hex.
    pub fingerprint: String,
}

/// Loads the identity from `dir`, creating certificate and key on first use.
pub fn load_or_create(dir: &Path) -> anyhow::Result<Identity> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if !cert_path.exists() || !key_path.exists() {
        make_certificate(dir)?;
    }
    let cert = std::fs::read(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    let key =
        std::fs::read(&key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    Ok(Identity {
        fingerprint: hex::encode(Sha256::digest(&cert)),
        cert: CertificateDer::from(cert),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    })
}

fn make_certificate(dir: &Path) -> anyhow::Result<String> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .context("cannot generate the TLS certificate")?;
    write_private(&dir.join(KEY_FILE), &certified.signing_key.serialize_der())?;
    let cert_path = dir.join(CERT_FILE);
    std::fs::write(&cert_path, certified.cert.der())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    Ok(hex::encode(Sha256::digest(certified.cert.der())))
}

/// `foreman cert rotate`: a new key and certificate, the old pair kept as
/// `*.previous`; returns the new fingerprint. Run with the foreman stopped.
/// Join tokens' secrets stay valid; only the fingerprint workers pin changes.
pub fn rotate(dir: &Path) -> anyhow::Result<String> {
    for file in [CERT_FILE, KEY_FILE] {
        let path = dir.join(file);
        anyhow::ensure!(
            path.exists(),
            "{} does not exist: is {} a foreman's data dir?",
            path.display(),
            dir.display()
        );
        let previous = dir.join(format!("{file}.previous"));
        std::fs::rename(&path, &previous)
            .with_context(|| format!("cannot move {} aside", path.display()))?;
    }
    let fingerprint = make_certificate(dir)?;
    // The bootstrap join token keeps its secret and gets the new fingerprint.
    let join_path = dir.join(JOIN_TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&join_path) {
        let secret = text.trim().split(':').next().unwrap_or("");
        write_private(&join_path, format!("{secret}:{fingerprint}\n").as_bytes())?;
    }
    Ok(fingerprint)
}

/// The bootstrap tokens as the banner shows them.
pub struct Bootstrap {
    /// The join token to print (`wgw_ID_SECRET:FINGERPRINT`), or why there is none.
    pub join: Result<String, String>,
    /// The client token's file, or why its token is unusable.
    pub client: Result<std::path::PathBuf, String>,
}

/// Makes the join and client tokens on first start (their strings go to
/// mode-0600 files in `dir`; the store keeps only hashes), and checks them
/// on later starts.
pub fn bootstrap(dir: &Path, tokens: &Tokens, fingerprint: &str) -> anyhow::Result<Bootstrap> {
    let join_path = dir.join(JOIN_TOKEN_FILE);
    let join = match std::fs::read_to_string(&join_path) {
        Err(_) => {
            let issued = tokens.issue(TokenKind::Worker, "bootstrap", None)?;
            let token = format!("{}:{fingerprint}", issued.token);
            write_private(&join_path, format!("{token}\n").as_bytes())?;
            tracing::info!(token = issued.row.id, "made the bootstrap join token");
            Ok(token)
        }
        Ok(text) => {
            let secret = text.trim().split(':').next().unwrap_or("").to_owned();
            match tokens.check(&secret, TokenKind::Worker)? {
                Ok(_) => Ok(format!("{secret}:{fingerprint}")),
                Err(refusal) => Err(format!("the token in {}: {refusal}", join_path.display())),
            }
        }
    };
    let client_path = dir.join(CLIENT_TOKEN_FILE);
    let client = match std::fs::read_to_string(&client_path) {
        Err(_) => {
            let issued = tokens.issue(TokenKind::Client, "bootstrap admin", None)?;
            write_private(&client_path, format!("{}\n", issued.token).as_bytes())?;
            tracing::info!(token = issued.row.id, "made the bootstrap client token");
            Ok(client_path)
        }
        Ok(text) => match tokens.check(text.trim(), TokenKind::Client)? {
            Ok(_) => Ok(client_path),
            Err(refusal) => Err(format!("the token in {}: {refusal}", client_path.display())),
        },
    };
    Ok(Bootstrap { join, client })
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn identity_is_made_once_and_kept_until_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(first.fingerprint.len(), 64);

        let store = Store::open(&dir.path().join("foreman.db")).unwrap();
        let tokens = Tokens::new(store);
        let boot = bootstrap(dir.path(), &tokens, &first.fingerprint).unwrap();
        let join = boot.join.unwrap();
        assert!(join.ends_with(&first.fingerprint), "{join}");
        let client_file = std::fs::read_to_string(boot.client.unwrap()).unwrap();
        assert!(client_file.starts_with("wgc_"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(CLIENT_TOKEN_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let rotated = rotate(dir.path()).unwrap();
        assert_ne!(rotated, first.fingerprint);
        assert_eq!(load_or_create(dir.path()).unwrap().fingerprint, rotated);
        assert!(dir.path().join("foreman-cert.der.previous").exists());
        let again = bootstrap(dir.path(), &tokens, &rotated).unwrap();
        let secret = join.split(':').next().unwrap();
        assert_eq!(again.join.unwrap(), format!("{secret}:{rotated}"));

        let (_, id, _) = crate::tokens::parse(secret).unwrap();
        tokens.revoke(id).unwrap();
        let revoked = bootstrap(dir.path(), &tokens, &rotated).unwrap();
        assert!(revoked.join.unwrap_err().contains("was revoked"));
    }
}
