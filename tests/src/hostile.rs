//! A peer that speaks the real protocol to a real foreman over QUIC
//! (pinned certificate, preamble, hello with the join token) and can then
//! send anything: well-formed messages it has no right to send, floods, or
//! raw bytes. For the hostile-peer tests.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use wasmgrid_protocol::stream::read_message;
use wasmgrid_protocol::wire::{
    encode_frame, FrameDecoder, Preamble, ToForeman, ToWorker, WorkerInfo,
};
use wasmgrid_protocol::{CacheSource, CapturedOutput, TaskOutcome, TaskReport, TaskTimings};

/// The foreman's QUIC close code for a worker it cut off (`net::close`).
pub const PROTOCOL_VIOLATION: u32 = 5;

/// One connection to the foreman, driven by hand.
pub struct Peer {
    pub connection: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// Set once the foreman welcomed this peer.
    pub worker_id: Option<u64>,
    _endpoint: quinn::Endpoint,
}

/// What a peer says about itself in its hello.
pub fn worker_info(name: &str, slots: u32) -> WorkerInfo {
    WorkerInfo {
        name: name.into(),
        hostname: "hostile-test".into(),
        os: "linux".into(),
        arch: "x86_64".into(),
        cores: slots,
        // Unknown: every task fits, whatever its memory limit.
        memory_bytes: 0,
        slots,
        wasmtime_version: "none".into(),
        engine_hash: "none".into(),
        cpu_model: String::new(),
        benchmark_fuel_per_sec: 0,
        cpu_limit_percent: 100,
        priority: Default::default(),
    }
}

/// A report as an honest worker would send it, with this outcome.
pub fn report(outcome: TaskOutcome) -> TaskReport {
    TaskReport {
        outcome,
        fuel_used: 1,
        cache: CacheSource::Memory,
        timings: TaskTimings::default(),
        stdout: CapturedOutput::default(),
        stderr: CapturedOutput::default(),
    }
}

impl Peer {
    /// Connects to `quic` trusting only the certificate in `token`
    /// (`SECRET:FINGERPRINT`) and opens the control stream; sends nothing.
    pub async fn connect(quic: &str, token: &str) -> anyhow::Result<Peer> {
        let (_, fingerprint) = token
            .split_once(':')
            .context("a SECRET:FINGERPRINT token")?;
        let addr: SocketAddr = quic.parse().context("a QUIC address")?;
        let endpoint = quinn::Endpoint::client(SocketAddr::new([127, 0, 0, 1].into(), 0))?;
        let config = wasmgrid_worker::join::client_config(fingerprint)?;
        let connection = endpoint
            .connect_with(config, addr, wasmgrid_worker::join::SERVER_NAME)?
            .await
            .context("QUIC handshake")?;
        let (send, recv) = connection.open_bi().await?;
        Ok(Peer {
            connection,
            send,
            recv,
            decoder: FrameDecoder::new(),
            worker_id: None,
            _endpoint: endpoint,
        })
    }

    /// Connects and joins as a worker with this name and slots.
    pub async fn join(quic: &str, token: &str, name: &str, slots: u32) -> anyhow::Result<Peer> {
        let mut peer = Peer::connect(quic, token).await?;
        peer.hello(token, worker_info(name, slots)).await?;
        Ok(peer)
    }

    /// Preamble both ways, then the hello; returns the worker id welcomed.
    pub async fn hello(&mut self, token: &str, info: WorkerInfo) -> anyhow::Result<u64> {
        let (secret, _) = token
            .split_once(':')
            .context("a SECRET:FINGERPRINT token")?;
        self.send_raw(&Preamble::ours().encode()).await?;
        let mut theirs = [0u8; Preamble::LEN];
        self.recv.read_exact(&mut theirs).await?;
        Preamble::decode(&theirs)?;
        self.send(&ToForeman::Hello {
            token: secret.to_owned(),
            info,
        })
        .await?;
        match self.next(Duration::from_secs(10)).await? {
            Some(ToWorker::Welcome { worker_id, .. }) => {
                self.worker_id = Some(worker_id);
                Ok(worker_id)
            }
            other => bail!("expected a welcome, got {other:?}"),
        }
    }

    pub async fn send(&mut self, message: &ToForeman) -> anyhow::Result<()> {
        self.send_raw(&encode_frame(message)?).await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// The next message from the foreman; `None` when it finished the stream.
    pub async fn next(&mut self, within: Duration) -> anyhow::Result<Option<ToWorker>> {
        tokio::time::timeout(within, read_message(&mut self.recv, &mut self.decoder))
            .await
            .context("the foreman sent nothing in time")?
    }

    /// Waits for the foreman to close the connection: its close code and
    /// reason, or `None` if it is still open after `within` (or closed
    /// another way, such as an idle timeout).
    pub async fn closed_by_foreman(&self, within: Duration) -> Option<(u32, String)> {
        let reason = tokio::time::timeout(within, self.connection.closed())
            .await
            .ok()?;
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) => Some((
                u32::try_from(close.error_code.into_inner()).unwrap_or(u32::MAX),
                String::from_utf8_lossy(&close.reason).into_owned(),
            )),
            _ => None,
        }
    }
}

/// Resident memory of a process, in bytes (Linux `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A small seeded generator (xorshift64*), so a failing run can be repeated.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}
