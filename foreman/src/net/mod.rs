//! The QUIC side of the foreman: TLS 1.3 with our own certificate, the
//! version handshake, join tokens, and one session per worker.

mod budget;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quinn_proto::HashedConnectionIdGenerator;
use wasmgrid_protocol::wire::{ALPN_ANY_VERSION, ALPN_VERSIONED};

use crate::driver::Driver;
use crate::identity::Identity;
use crate::store::Store;
use crate::tokens::Tokens;

/// QUIC application close codes, with a reason for people.
pub mod close {
    pub const NOT_WASMGRID: u32 = 1;
    pub const INCOMPATIBLE_VERSION: u32 = 2;
    pub const BAD_TOKEN: u32 = 3;
    pub const PROTOCOL_ERROR: u32 = 4;
    /// The worker broke the protocol after joining and was cut off.
    pub const PROTOCOL_VIOLATION: u32 = 5;
}

/// Module fetches a worker may have open at once.
const MAX_MODULE_STREAMS: u32 = 8;
/// Bytes a worker may have in flight to us on one connection, unread.
const RECEIVE_WINDOW: u32 = 32 << 20;

pub struct NetContext {
    /// Checks join tokens and cuts off workers whose token is revoked.
    pub tokens: Arc<Tokens>,
    /// A worker silent this long is offline: its connection is closed and
    /// its tasks go back to the queue.
    pub heartbeat_timeout: Duration,
    pub store: Store,
    pub driver: Driver,
    /// Largest frame a joined worker may send (a batch of reports).
    pub max_worker_frame: usize,
}

pub fn endpoint(identity: &Identity, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .context("the foreman's certificate or key is unusable")?;
    tls.alpn_protocols = vec![ALPN_VERSIONED.to_vec(), ALPN_ANY_VERSION.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(Duration::from_secs(30).try_into()?))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        // The control stream plus module fetches.
        .max_concurrent_bidi_streams((1 + MAX_MODULE_STREAMS).into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(RECEIVE_WINDOW.into());
    wasmgrid_protocol::stream::sparse_acks(&mut transport);
    server.transport_config(Arc::new(transport));
    let mut config = quinn::EndpointConfig::new(Arc::new(stateless_reset_key(identity)));
    let cid_key = connection_id_key(identity);
    config.cid_generator(move || Box::new(HashedConnectionIdGenerator::from_key(cid_key)));
    let socket =
        std::net::UdpSocket::bind(addr).with_context(|| format!("cannot listen on {addr}/udp"))?;
    quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
        .with_context(|| format!("cannot listen on {addr}/udp"))
}

/// The key of the stateless resets this foreman sends, the same after a
/// restart (it is derived from the TLS key): a worker still connected to
/// the previous process learns from the next packet it sends that its
/// connection is gone and joins again, instead of waiting out its idle
/// timeout (RFC 9000, section 10.3).
fn stateless_reset_key(identity: &Identity) -> ring::hmac::Key {
    ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        derived(identity, b"stateless reset key").as_ref(),
    )
}

/// The key that signs the connection ids this foreman hands out, the same
/// after a restart: packets for the previous process's connections are
/// then recognised as such and answered with a stateless reset, where an
/// id it cannot check is dropped unanswered.
fn connection_id_key(identity: &Identity) -> u64 {
    let digest = derived(identity, b"connection id key");
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(key)
}

fn derived(identity: &Identity, purpose: &[u8]) -> ring::digest::Digest {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(b"wasmgrid ");
    digest.update(purpose);
    digest.update(b"\0");
    digest.update(identity.key.secret_der());
    digest.finish()
}

/// Accepts workers until the endpoint closes.
pub async fn accept(endpoint: quinn::Endpoint, ctx: Arc<NetContext>) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            if let Err(error) = session::run(incoming, ctx).await {
                tracing::warn!(%remote, "worker session ended: {error:#}");
            }
        });
    }
}
