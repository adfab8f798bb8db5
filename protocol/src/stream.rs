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
