//! The foreman's identity: a self-signed TLS certificate made on first start,
//! its fingerprint (which workers pin), and the join token.

use std::path::Path;

use anyhow::Context;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// The name in the certificate; workers connect with it as the server name.
pub const SERVER_NAME: &str = "wasmgrid-foreman";

pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// sha256 of the certificate, lowercase hex.
    pub fingerprint: String,
    /// The secret part of the join token.
    pub secret: String,
}

impl Identity {
    /// What a worker needs to join: the secret and the fingerprint to pin, as one string.
    pub fn join_token(&self) -> String {
        format!("{}:{}", self.secret, self.fingerprint)
    }
}

/// Loads the identity from `dir`, creating certificate, key and secret on first use.
pub fn load_or_create(dir: &Path) -> anyhow::Result<Identity> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert_path = dir.join("foreman-cert.der");
    let key_path = dir.join("foreman-key.der");
    let secret_path = dir.join("join-secret");
    if !cert_path.exists() || !key_path.exists() {
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
            .context("cannot generate the TLS certificate")?;
        write_private(&key_path, &certified.signing_key.serialize_der())?;
        std::fs::write(&cert_path, certified.cert.der())
            .with_context(|| format!("cannot write {}", cert_path.display()))?;
    }
    if !secret_path.exists() {
        let secret: [u8; 16] = rand::random();
        write_private(&secret_path, hex::encode(secret).as_bytes())?;
    }
    let cert = std::fs::read(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    let key =
        std::fs::read(&key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let secret = std::fs::read_to_string(&secret_path)
        .with_context(|| format!("cannot read {}", secret_path.display()))?;
    Ok(Identity {
        fingerprint: hex::encode(Sha256::digest(&cert)),
        cert: CertificateDer::from(cert),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        secret: secret.trim().to_owned(),
    })
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

    #[test]
    fn identity_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint);
        assert_eq!(first.join_token(), again.join_token());
        assert_eq!(first.fingerprint.len(), 64);
    }
}
