//! Reading framed messages from a QUIC stream (both foreman and worker).

use serde::Deserialize;

use crate::wire::FrameDecoder;

/// The next message on `recv`; `None` when the peer finished the stream.
pub async fn read_message<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
    decoder: &mut FrameDecoder,
) -> anyhow::Result<Option<T>> {
    loop {
        if let Some(message) = decoder.next_message()? {
            return Ok(Some(message));
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => decoder.push(&chunk.bytes),
            None => return Ok(None),
        }
    }
}

/// Asks the peer to acknowledge after this many packets, or after
/// [`ACK_DELAY`], unless it has data to send anyway (an ACK then rides
/// along for free). Messages flow both ways all through a job, so nearly
/// every ACK can ride on one; a lone ACK wakes the receiver's runtime thread,
/// which on a busy worker takes a core from a running task.
const ACKS_AFTER_PACKETS: u32 = 16;
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(25);

/// Requests sparse acknowledgements from the peer (the QUIC ACK frequency
/// extension; a peer without it acknowledges as RFC 9000 says).
pub fn sparse_acks(transport: &mut quinn::TransportConfig) {
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACKS_AFTER_PACKETS.into())
        .max_ack_delay(Some(ACK_DELAY));
    transport.ack_frequency_config(Some(acks));
}
