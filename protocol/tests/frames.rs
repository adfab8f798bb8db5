//! Properties of the framing every peer's bytes go through: whatever arrives,
//! in whatever pieces, decodes the same, never panics and never makes the
//! decoder hold more than one frame and one read.

use proptest::collection::vec;
use proptest::prelude::*;
use wasmgrid_protocol::wire::{
    encode_frame, Assignment, Finished, FrameDecoder, Load, ModuleReply, SlotPriority, ToForeman,
    ToWorker, WireError, WorkerInfo, MAX_FRAME_BYTES,
};
use wasmgrid_protocol::{
    CacheSource, CapturedOutput, Failure, FailureKind, TaskLimits, TaskReport, TaskTimings,
};

/// What a reader sees: messages until the stream runs out or the first error.
#[derive(Debug, PartialEq)]
enum Event<T> {
    Message(T),
    Error(WireError),
}

/// Feeds `stream` in pieces cut at `cuts`, reading every message after each
/// piece the way `stream::read_message` does; checks the buffer bound as it goes.
fn decode_in_pieces<T>(stream: &[u8], cuts: &[usize]) -> Vec<Event<T>>
where
    T: for<'de> serde::Deserialize<'de>,
{
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    bounds.push(0);
    bounds.push(stream.len());
    bounds.sort_unstable();
    let mut decoder = FrameDecoder::new();
    let mut events = Vec::new();
    for piece in bounds.windows(2) {
        let chunk = &stream[piece[0]..piece[1]];
        decoder.push(chunk);
        assert!(
            decoder.buffered() <= 4 + MAX_FRAME_BYTES + chunk.len(),
            "holding {} bytes after a read of {}",
            decoder.buffered(),
            chunk.len()
        );
        loop {
            match decoder.next_message::<T>() {
                Ok(Some(message)) => events.push(Event::Message(message)),
                Ok(None) => break,
                Err(error) => {
                    events.push(Event::Error(error));
                    return events;
                }
            }
        }
    }
    events
}

fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn worker_info() -> impl Strategy<Value = WorkerInfo> {
    (
        (text(), text(), text(), text()),
        (any::<u32>(), any::<u64>(), any::<u32>()),
        (text(), text(), text()),
        (any::<u64>(), any::<u32>(), 0..3usize),
    )
        .prop_map(
            |(
                (name, hostname, os, arch),
                (cores, memory_bytes, slots),
                (wasmtime_version, engine_hash, cpu_model),
                (benchmark_fuel_per_sec, cpu_limit_percent, priority),
            )| WorkerInfo {
                name,
                hostname,
                os,
                arch,
                cores,
                memory_bytes,
                slots,
                wasmtime_version,
                engine_hash,
                cpu_model,
                benchmark_fuel_per_sec,
                cpu_limit_percent,
                priority: [SlotPriority::Normal, SlotPriority::Low, SlotPriority::Idle][priority],
            },
        )
}

fn report() -> impl Strategy<Value = TaskReport> {
    let outcome = prop_oneof![
        text().prop_map(Ok),
        (0..FailureKind::ALL.len(), text())
            .prop_map(|(k, message)| Err(Failure::new(FailureKind::ALL[k], message))),
    ];
    let output =
        || (text(), any::<bool>()).prop_map(|(text, truncated)| CapturedOutput { text, truncated });
    (outcome, any::<u64>(), any::<[u64; 3]>(), output(), output()).prop_map(
        |(outcome, fuel_used, [load_us, instantiate_us, run_us], stdout, stderr)| TaskReport {
            outcome,
            fuel_used,
            cache: CacheSource::Disk,
            timings: TaskTimings {
                load_us,
                instantiate_us,
                run_us,
            },
            stdout,
            stderr,
        },
    )
}

fn to_foreman() -> impl Strategy<Value = ToForeman> {
    prop_oneof![
        (text(), worker_info()).prop_map(|(token, info)| ToForeman::Hello { token, info }),
        any::<u32>().prop_map(ToForeman::Credit),
        vec((any::<u64>(), report()), 0..4).prop_map(|reports| ToForeman::Finished(
            reports
                .into_iter()
                .map(|(attempt, report)| Finished { attempt, report })
                .collect()
        )),
        any::<(u32, u64, u64, u32)>().prop_map(|(cpu_permille, used, rss, running)| {
            ToForeman::Heartbeat(Load {
                cpu_permille,
                memory_used_bytes: used,
                worker_rss_bytes: rss,
                running,
            })
        }),
        Just(ToForeman::Draining),
        vec(any::<u64>(), 0..8).prop_map(ToForeman::Returned),
    ]
}

fn to_worker() -> impl Strategy<Value = ToWorker> {
    let assignment = (any::<u64>(), any::<[u8; 32]>(), text(), any::<[u64; 3]>()).prop_map(
        |(attempt, module, args, [fuel, memory_bytes, timeout_ms])| Assignment {
            attempt,
            module,
            args,
            limits: TaskLimits {
                fuel,
                memory_bytes,
                timeout_ms,
                ..TaskLimits::default()
            },
        },
    );
    prop_oneof![
        any::<(u64, u64)>().prop_map(|(worker_id, heartbeat_ms)| ToWorker::Welcome {
            worker_id,
            heartbeat_ms
        }),
        vec(assignment, 0..4).prop_map(ToWorker::Run),
        vec(any::<u64>(), 0..8).prop_map(ToWorker::Cancel),
        any::<u64>().prop_map(|grace_ms| ToWorker::Drain { grace_ms }),
        (vec(any::<u64>(), 0..8), any::<u32>()).prop_map(|(attempts, believed_unstarted)| {
            ToWorker::GiveBack {
                attempts,
                believed_unstarted,
            }
        }),
        any::<bool>().prop_map(ToWorker::Backlog),
    ]
}

fn frames<T: serde::Serialize>(messages: &[T]) -> Vec<u8> {
    messages
        .iter()
        .flat_map(|m| encode_frame(m).expect("small messages encode"))
        .collect()
}

proptest! {
    #[test]
    fn any_bytes_split_anywhere_decode_as_they_do_whole(
        stream in vec(any::<u8>(), 0..2048),
        cuts in vec(any::<usize>(), 0..16),
    ) {
        let whole = decode_in_pieces::<ToForeman>(&stream, &[]);
        prop_assert_eq!(decode_in_pieces::<ToForeman>(&stream, &cuts), whole);
        let whole = decode_in_pieces::<ToWorker>(&stream, &[]);
        prop_assert_eq!(decode_in_pieces::<ToWorker>(&stream, &cuts), whole);
    }

    #[test]
    fn valid_frames_then_garbage_yield_the_messages_then_one_error_or_nothing(
        messages in vec(to_foreman(), 1..6),
        garbage in vec(any::<u8>(), 0..64),
        cuts in vec(any::<usize>(), 0..16),
    ) {
        let mut stream = frames(&messages);
        stream.extend_from_slice(&garbage);
        let events = decode_in_pieces::<ToForeman>(&stream, &cuts);
        let decoded: Vec<&ToForeman> = events
            .iter()
            .filter_map(|e| match e { Event::Message(m) => Some(m), Event::Error(_) => None })
            .collect();
        prop_assert!(decoded.len() >= messages.len());
        prop_assert_eq!(&decoded[..messages.len()], &messages.iter().collect::<Vec<_>>()[..]);
    }

    #[test]
    fn messages_to_the_foreman_round_trip(
        messages in vec(to_foreman(), 0..6),
        cuts in vec(any::<usize>(), 0..16),
    ) {
        let events = decode_in_pieces::<ToForeman>(&frames(&messages), &cuts);
        prop_assert_eq!(events, messages.into_iter().map(Event::Message).collect::<Vec<_>>());
    }

    #[test]
    fn messages_to_the_worker_round_trip(
        messages in vec(to_worker(), 0..6),
        cuts in vec(any::<usize>(), 0..16),
    ) {
        let events = decode_in_pieces::<ToWorker>(&frames(&messages), &cuts);
        prop_assert_eq!(events, messages.into_iter().map(Event::Message).collect::<Vec<_>>());
    }

    #[test]
    fn module_replies_round_trip(wasm in vec(any::<u8>(), 0..4096), cuts in vec(any::<usize>(), 0..8)) {
        let messages = vec![ModuleReply::Found(wasm), ModuleReply::Unknown];
        let events = decode_in_pieces::<ModuleReply>(&frames(&messages), &cuts);
        prop_assert_eq!(events, messages.into_iter().map(Event::Message).collect::<Vec<_>>());
    }
}

#[test]
fn a_frame_announcing_more_than_the_limit_is_refused_before_it_arrives() {
    let mut decoder = FrameDecoder::new();
    let too_long = (MAX_FRAME_BYTES as u32 + 1).to_le_bytes();
    decoder.push(&too_long);
    assert_eq!(
        decoder.next_message::<ToForeman>(),
        Err(WireError::FrameTooLarge(
            MAX_FRAME_BYTES + 1,
            MAX_FRAME_BYTES
        ))
    );
    assert_eq!(decoder.buffered(), 4);
}
