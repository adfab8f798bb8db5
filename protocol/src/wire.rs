//! Messages between foreman and worker, and their framing.
//!
//! A connection is one QUIC bidirectional stream for control and tasks, plus
//! one short bidirectional stream per module fetch. Both sides first send a
//! [`Preamble`] (magic and protocol version), so an incompatible peer is told
//! both versions before any message is decoded. After that, every message is
//! a frame: a little-endian u32 length, then the message in postcard.

use serde::{Deserialize, Serialize};

use crate::{TaskLimits, TaskReport};

/// Protocol version; bumped on any change to the messages below.
pub const PROTOCOL_VERSION: u16 = 7;

/// TLS application protocols a worker offers: this exact version first, then
/// the bare name, which lets a foreman of another version still answer with
/// a message that says both versions.
pub const ALPN_VERSIONED: &[u8] = b"wasmgrid/7";
pub const ALPN_ANY_VERSION: &[u8] = b"wasmgrid";

/// Largest frame either side accepts (a module upload is the biggest message).
pub const MAX_FRAME_BYTES: usize = 128 << 20;

/// Most slots a worker may announce.
pub const MAX_SLOTS: u32 = 1024;

/// Most attempts a worker may queue per slot beyond the one it runs: the
/// credit it may grant is `slots * (1 + MAX_PREFETCH_PER_SLOT)`.
pub const MAX_PREFETCH_PER_SLOT: u32 = 512;

/// Report bytes (results and output) a worker puts in one `Finished`
/// message before starting another, so its frames stay well under the
/// foreman's limit for worker frames.
pub const FINISHED_BATCH_BYTES: usize = 4 << 20;

const MAGIC: [u8; 4] = *b"WGRD";

/// The first six bytes on a connection's control stream, in each direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub version: u16,
}

impl Preamble {
    pub const LEN: usize = 6;

    pub fn ours() -> Self {
        Preamble {
            version: PROTOCOL_VERSION,
        }
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let v = self.version.to_le_bytes();
        [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], v[0], v[1]]
    }

    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Self, WireError> {
        if bytes[..4] != MAGIC {
            return Err(WireError::NotWasmgrid);
        }
        Ok(Preamble {
            version: u16::from_le_bytes([bytes[4], bytes[5]]),
        })
    }
}

/// The sha256 of a module's bytes.
pub type ModuleHash = [u8; 32];

/// Names one attempt at one task; unique for the foreman's lifetime and beyond.
pub type AttemptId = u64;

/// What a worker tells the foreman about itself when it joins.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub hostname: String,
    pub os: String,
    pub arch: String,
    pub cores: u32,
    pub memory_bytes: u64,
    pub slots: u32,
    pub wasmtime_version: String,
    pub engine_hash: String,
    /// As the OS names it (`model name` in /proc/cpuinfo); empty when unknown.
    pub cpu_model: String,
    /// Fuel one slot burns per second on the built-in benchmark, measured at
    /// start under the CPU cap: the performance scheduler's first guess of
    /// this worker's speed, in the unit tasks report. 0 when not measured.
    pub benchmark_fuel_per_sec: u64,
    /// The volunteer's cap on each slot's CPU time, in percent (100: none).
    pub cpu_limit_percent: u32,
    /// How its tasks share the machine with the owner's programs.
    pub priority: SlotPriority,
}

/// The scheduling priority a worker's slot threads run tasks at: how much
/// they defer to everything else on the volunteer's PC.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotPriority {
    /// As any other program.
    #[default]
    Normal,
    /// Nice 19: the owner's programs come first, and tasks still get a
    /// sliver of a busy machine.
    Low,
    /// Only what would otherwise be idle (Linux `SCHED_IDLE`; elsewhere as `low`).
    Idle,
}

impl SlotPriority {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotPriority::Normal => "normal",
            SlotPriority::Low => "low",
            SlotPriority::Idle => "idle",
        }
    }

    /// The priority named by [`SlotPriority::as_str`].
    pub fn from_name(name: &str) -> Option<SlotPriority> {
        [SlotPriority::Normal, SlotPriority::Low, SlotPriority::Idle]
            .into_iter()
            .find(|p| p.as_str() == name)
    }
}

impl std::fmt::Display for SlotPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How busy a worker's machine is, sent with every heartbeat.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// CPU time used by the whole machine since the last heartbeat, in per
    /// mille of all its cores.
    pub cpu_permille: u32,
    /// Memory in use on the machine (total minus available).
    pub memory_used_bytes: u64,
    /// Resident memory of the worker process.
    pub worker_rss_bytes: u64,
    /// Tasks running now.
    pub running: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToForeman {
    /// First message: who the worker is and its join token.
    Hello { token: String, info: WorkerInfo },
    /// The worker can take `n` more tasks (slots plus a prefetch window).
    Credit(u32),
    /// Reports of finished attempts; each also returns one credit.
    Finished(Vec<Finished>),
    /// Still alive, and how busy.
    Heartbeat(Load),
    /// The worker is leaving: it grants no more credit, finishes what runs
    /// (within its grace period) and hands back what has not started.
    Draining,
    /// Attempts handed back unstarted (while draining, or when asked with
    /// `GiveBack`); each returns one credit and the task is queued again
    /// without counting as an attempt.
    Returned(Vec<AttemptId>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    pub attempt: AttemptId,
    pub report: TaskReport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The worker is registered under this id and must send something
    /// (a heartbeat if nothing else) at least every `heartbeat_ms`.
    Welcome { worker_id: u64, heartbeat_ms: u64 },
    /// Tasks to run, within the credit the worker granted.
    Run(Vec<Assignment>),
    /// Stop these attempts; their reports are no longer wanted.
    Cancel(Vec<AttemptId>),
    /// Leave gracefully, as on SIGTERM: send `Draining`, return unstarted
    /// attempts, let running ones finish for at most `grace_ms` (then cancel
    /// them), report, and close.
    Drain { grace_ms: u64 },
    /// Hand back some of these attempts (newest first) that no slot has
    /// started, with `Returned` (if any): another worker idles, or soon
    /// will, at the end of their job. The foreman asked for them believing
    /// the worker had `believed_unstarted` unstarted, from reports that may
    /// be held back; the worker hands back the same share of those it
    /// really has. Those already started run and report as usual.
    GiveBack {
        attempts: Vec<AttemptId>,
        believed_unstarted: u32,
    },
    /// Whether tasks wait at the foreman for credit (a worker assumes they
    /// do until told otherwise). While none waits, a worker may hold its
    /// reports for company even with little queued: the credit they return
    /// could not be used yet.
    Backlog(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub attempt: AttemptId,
    pub module: ModuleHash,
    pub args: String,
    pub limits: TaskLimits,
}

/// A module fetch, on its own stream: the worker sends this, the foreman
/// answers with [`ModuleReply`] and closes the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchModule(pub ModuleHash);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleReply {
    Found(#[serde(with = "serde_bytes")] Vec<u8>),
    Unknown,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("the peer is not speaking the wasmgrid protocol (bad preamble)")]
    NotWasmgrid,
    #[error("frame of {0} bytes is larger than the limit of {1} bytes")]
    FrameTooLarge(usize, usize),
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// One message as a frame: length, then postcard.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let mut frame = postcard::to_extend(message, vec![0u8; 4])
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = frame.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(WireError::FrameTooLarge(len, MAX_FRAME_BYTES));
    }
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(frame)
}

/// Splits a byte stream into messages, enforcing a frame limit
/// ([`MAX_FRAME_BYTES`] unless set lower).
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    consumed: usize,
    max_frame: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::with_limit(MAX_FRAME_BYTES)
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that refuses frames over `max_frame` bytes (at most
    /// [`MAX_FRAME_BYTES`]) before buffering them.
    pub fn with_limit(max_frame: usize) -> Self {
        FrameDecoder {
            buffer: Vec::new(),
            consumed: 0,
            max_frame: max_frame.min(MAX_FRAME_BYTES),
        }
    }

    /// Lowers or raises the frame limit (at most [`MAX_FRAME_BYTES`]).
    pub fn set_limit(&mut self, max_frame: usize) {
        self.max_frame = max_frame.min(MAX_FRAME_BYTES);
    }

    pub fn push(&mut self, bytes: &[u8]) {
        // Drop what was decoded, so only one partial frame and this read are held.
        if self.consumed > 0 {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes held: at most a frame's length prefix and [`MAX_FRAME_BYTES`]
    /// plus the last push, when every push is followed by reading messages
    /// until there is none or an error.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next complete message, if one has arrived.
    pub fn next_message<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, WireError> {
        let pending = &self.buffer[self.consumed..];
        if pending.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([pending[0], pending[1], pending[2], pending[3]]) as usize;
        if len > self.max_frame {
            return Err(WireError::FrameTooLarge(len, self.max_frame));
        }
        if pending.len() < 4 + len {
            return Ok(None);
        }
        let message = postcard::from_bytes(&pending[4..4 + len])
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        self.consumed += 4 + len;
        if self.consumed > self.buffer.len() / 2 {
            self.buffer.drain(..self.consumed);
            self.consumed = 0;
        }
        Ok(Some(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_split_at_any_byte() {
        let messages = vec![
            ToForeman::Credit(7),
            ToForeman::Heartbeat(Load {
                cpu_permille: 250,
                memory_used_bytes: 1 << 30,
                worker_rss_bytes: 1 << 26,
                running: 2,
            }),
            ToForeman::Draining,
            ToForeman::Returned(vec![1, 2]),
            ToForeman::Hello {
                token: "t".into(),
                info: WorkerInfo {
                    name: "w".into(),
                    hostname: "h".into(),
                    os: "linux".into(),
                    arch: "x86_64".into(),
                    cores: 2,
                    memory_bytes: 1 << 30,
                    slots: 2,
                    wasmtime_version: "48".into(),
                    engine_hash: "abc".into(),
                    cpu_model: "cpu".into(),
                    benchmark_fuel_per_sec: 1_000_000_000,
                    cpu_limit_percent: 100,
                    priority: SlotPriority::Idle,
                },
            },
        ];
        let stream: Vec<u8> = messages
            .iter()
            .flat_map(|m| encode_frame(m).unwrap())
            .collect();
        for split in 0..stream.len() {
            let mut decoder = FrameDecoder::new();
            let mut got = Vec::new();
            for chunk in [&stream[..split], &stream[split..]] {
                decoder.push(chunk);
                while let Some(m) = decoder.next_message::<ToForeman>().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, messages, "split at {split}");
        }
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decoder.next_message::<ToForeman>(),
            Err(WireError::FrameTooLarge(_, MAX_FRAME_BYTES))
        ));
        let mut decoder = FrameDecoder::with_limit(16);
        decoder.push(&17u32.to_le_bytes());
        assert_eq!(
            decoder.next_message::<ToForeman>(),
            Err(WireError::FrameTooLarge(17, 16))
        );
        let mut decoder = FrameDecoder::new();
        decoder.push(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        assert!(matches!(
            decoder.next_message::<ToForeman>(),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn preamble_carries_the_version() {
        let bytes = Preamble::ours().encode();
        assert_eq!(Preamble::decode(&bytes).unwrap().version, PROTOCOL_VERSION);
        assert_eq!(Preamble::decode(b"HTTP/1"), Err(WireError::NotWasmgrid));
    }
}
