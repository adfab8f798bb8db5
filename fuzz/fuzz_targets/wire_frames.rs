//! Any bytes a peer sends, in any pieces: the frame decoder never panics,
//! decodes the pieces as it decodes the whole, and holds at most one frame
//! and one read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use wasmgrid_protocol::wire::{
    FetchModule, FrameDecoder, ModuleReply, Preamble, ToForeman, ToWorker, WireError,
    MAX_FRAME_BYTES,
};

fuzz_target!(|data: &[u8]| {
    // The first bytes choose the sizes of the reads; the rest is the stream.
    let (sizes, stream) = data.split_at(data.len().min(4));
    check::<ToForeman>(sizes, stream);
    check::<ToWorker>(sizes, stream);
    check::<FetchModule>(sizes, stream);
    check::<ModuleReply>(sizes, stream);
    if let Some(preamble) = stream.first_chunk::<{ Preamble::LEN }>() {
        let _ = Preamble::decode(preamble);
    }
});

fn check<T: DeserializeOwned + PartialEq + std::fmt::Debug>(sizes: &[u8], stream: &[u8]) {
    let whole = decode::<T>(stream, &[]);
    assert_eq!(decode::<T>(stream, sizes), whole);
}

/// Messages until the first error, reading in pieces of the given sizes (cycled).
fn decode<T: DeserializeOwned>(stream: &[u8], sizes: &[u8]) -> Vec<Result<T, WireError>> {
    let mut decoder = FrameDecoder::new();
    let mut events = Vec::new();
    let mut rest = stream;
    let mut size = sizes.iter().map(|&s| usize::from(s).max(1)).cycle();
    while !rest.is_empty() {
        let (piece, after) = rest.split_at(size.next().unwrap_or(rest.len()).min(rest.len()));
        rest = after;
        decoder.push(piece);
        assert!(decoder.buffered() <= 4 + MAX_FRAME_BYTES + piece.len());
        loop {
            match decoder.next_message::<T>() {
                Ok(Some(message)) => events.push(Ok(message)),
                Ok(None) => break,
                Err(error) => {
                    events.push(Err(error));
                    return events;
                }
            }
        }
    }
    events
}
