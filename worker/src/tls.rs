//! The worker's side of TLS: it trusts the one foreman certificate whose
//! sha256 is in its join token.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use sha2::{Digest, Sha256};
use wasmgrid_protocol::wire::{ALPN_ANY_VERSION, ALPN_VERSIONED};

use crate::join::FOREMAN_SILENCE;

/// The sha256 (hex) of a certificate refused for not being the pinned one.
pub type Mismatch = Arc<Mutex<Option<String>>>;

/// QUIC client settings that trust only the certificate with this sha256 (hex).
pub fn client_config(fingerprint: &str) -> anyhow::Result<quinn::ClientConfig> {
    pinned_client_config(fingerprint).map(|(config, _)| config)
}

/// [`client_config`], and where the fingerprint of a refused certificate is left.
pub fn pinned_client_config(fingerprint: &str) -> anyhow::Result<(quinn::ClientConfig, Mismatch)> {
    let pinned = hex::decode(fingerprint)
        .ok()
        .filter(|b| b.len() == 32)
        .context("the token's fingerprint is not 64 hex digits")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mismatch = Mismatch::default();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
            pinned,
            provider,
            mismatch: mismatch.clone(),
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_VERSIONED.to_vec(), ALPN_ANY_VERSION.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    // Notice a foreman that vanished without closing (killed, unplugged)
    // within seconds, so the reconnect loop can find its successor.
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(FOREMAN_SILENCE.try_into()?))
        .keep_alive_interval(Some(FOREMAN_SILENCE / 5));
    wasmgrid_protocol::stream::sparse_acks(&mut transport);
    config.transport_config(Arc::new(transport));
    Ok((config, mismatch))
}

/// Trusts exactly one certificate, by its sha256: no CA, no trust on first use.
#[derive(Debug)]
struct PinnedCertificate {
    pinned: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    mismatch: Mismatch,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let seen = Sha256::digest(end_entity.as_ref());
        if seen.as_slice() == self.pinned.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            if let Ok(mut mismatch) = self.mismatch.lock() {
                *mismatch = Some(hex::encode(seen));
            }
            Err(rustls::Error::General(
                "the foreman's certificate does not match the fingerprint in the token".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
