//! Stops a running guest from another thread with nothing compiled into its
//! code. A watchdog thread sends the guest's thread a signal; when the
//! handler finds the thread inside one of the guest's own functions, it
//! resumes it at a trapping instruction, and wasmtime unwinds that like any
//! other trap. (Lucet's kill switch worked the same way.) Hot loops then
//! carry no epoch check, which cost primes 1.3–1.5× of native.
//!
//! Signals that land outside the guest's code (in WASI, in the runtime) are
//! ignored and sent again at the next poll, so the host is never unwound.
//! Linux on x86-64 only; elsewhere the executor keeps epoch interruption.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use wasmtime::component::Component;

use super::CancelFlag;

/// How often the watchdog looks for cancelled tasks: the granularity of
/// cancellation. It wakes for a deadline exactly when it is due, so a
/// stream of short tasks wakes it rarely (each wakeup takes a core from a
/// running task).
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// How soon a signal that landed outside the guest's code is sent again.
const RESIGNAL: Duration = Duration::from_millis(5);

const RUNNING: u8 = 0;
const TIMED_OUT: u8 = 1;
const CANCELLED: u8 = 2;

/// Why a task was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    TimedOut,
    Cancelled,
}

/// Where a component's own wasm functions lie in memory: the only places a
/// signal may turn into a trap. Trampolines and host code are not in it.
#[derive(Debug, Default)]
pub struct GuestCode {
    /// Sorted, disjoint `[start, end)` address ranges.
    ranges: Box<[(usize, usize)]>,
}

impl GuestCode {
    pub fn of(component: &Component) -> Self {
        let base = component.text().as_ptr() as usize;
        Self::from_ranges(
            component
                .functions()
                .map(|f| (base + f.offset, base + f.offset + f.len)),
        )
    }

    fn from_ranges(ranges: impl Iterator<Item = (usize, usize)>) -> Self {
        let mut ranges: Vec<(usize, usize)> = ranges.filter(|(s, e)| s < e).collect();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (start, end) in ranges {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        GuestCode {
            ranges: merged.into_boxed_slice(),
        }
    }

    /// Allocation-free and lock-free: called from the signal handler.
    fn contains(&self, pc: usize) -> bool {
        let after = self.ranges.partition_point(|&(start, _)| start <= pc);
        after > 0 && pc < self.ranges[after - 1].1
    }
}

/// One running task as the watchdog and the signal handler see it.
struct Watch {
    thread: Thread,
    deadline: Instant,
    cancel: Option<CancelFlag>,
    /// `RUNNING` until the watchdog decides to stop the task.
    stop: AtomicU8,
    /// Set by the handler once it has sent the thread into the trap.
    fired: AtomicBool,
}

/// Stops tasks past their deadline or cancelled. Its thread sleeps while
/// no task runs, so an idle worker wakes nobody.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    running: Vec<Arc<Watch>>,
    /// The watchdog waits for a task to start, not for its next poll.
    asleep: bool,
    closing: bool,
}

/// With nothing running this long, the watchdog sleeps until a task
/// starts: a stream of short tasks must not wake it for every one.
const IDLE_BEFORE_SLEEP: Duration = Duration::from_millis(100);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Watchdog {
    /// `None` where signals cannot stop a guest (another OS or CPU, or no
    /// trap site found); use epoch interruption there.
    pub fn start() -> std::io::Result<Option<Self>> {
        if !signals::install() {
            return Ok(None);
        }
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            wake: Condvar::new(),
        });
        let state = shared.clone();
        let thread = thread::Builder::new()
            .name("wasmgrid-watchdog".into())
            .spawn(move || watch_loop(&state))?;
        Ok(Some(Watchdog {
            shared,
            thread: Some(thread),
        }))
    }

    /// Watches the task the calling thread is about to run, until the
    /// returned guard is dropped; `code` is the task's component.
    pub fn watch<'a>(
        &'a self,
        code: &'a GuestCode,
        timeout: Duration,
        cancel: Option<CancelFlag>,
    ) -> Watching<'a> {
        let watch = Arc::new(Watch {
            thread: Thread::current(),
            deadline: Instant::now() + timeout,
            cancel,
            stop: AtomicU8::new(RUNNING),
            fired: AtomicBool::new(false),
        });
        ACTIVE.set((Arc::as_ptr(&watch), code as *const GuestCode));
        compiler_fence(Ordering::SeqCst);
        let mut state = self.shared.lock();
        state.running.push(watch.clone());
        if state.asleep {
            state.asleep = false;
            self.shared.wake.notify_one();
        }
        drop(state);
        Watching {
            dog: self,
            watch,
            _code: PhantomData,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch_loop(shared: &Shared) {
    let mut state = shared.lock();
    // Asleep from the start: nothing runs yet.
    let mut idle_since = Instant::now().checked_sub(IDLE_BEFORE_SLEEP);
    while !state.closing {
        let now = Instant::now();
        if state.running.is_empty() {
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) >= IDLE_BEFORE_SLEEP {
                state.asleep = true;
                while state.asleep && !state.closing {
                    state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                }
                idle_since = None;
                continue;
            }
        } else {
            idle_since = None;
        }
        let mut next = now + CANCEL_POLL;
        for watch in &state.running {
            let reason = if watch
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                CANCELLED
            } else if now >= watch.deadline {
                TIMED_OUT
            } else {
                next = next.min(watch.deadline);
                continue;
            };
            let _ =
                watch
                    .stop
                    .compare_exchange(RUNNING, reason, Ordering::AcqRel, Ordering::Acquire);
            // The thread is alive: it unregisters under this lock before it can end.
            watch.thread.signal();
            next = next.min(now + RESIGNAL);
        }
        state = shared
            .wake
            .wait_timeout(state, next.saturating_duration_since(now))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// A task under watch; dropping it ends the watch.
pub struct Watching<'a> {
    dog: &'a Watchdog,
    watch: Arc<Watch>,
    _code: PhantomData<&'a GuestCode>,
}

impl Watching<'_> {
    /// Why the task was stopped, if a signal stopped it.
    pub fn stopped(&self) -> Option<Stopped> {
        if !self.watch.fired.load(Ordering::Acquire) {
            return None;
        }
        match self.watch.stop.load(Ordering::Acquire) {
            CANCELLED => Some(Stopped::Cancelled),
            _ => Some(Stopped::TimedOut),
        }
    }
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        ACTIVE.set((ptr::null(), ptr::null()));
        compiler_fence(Ordering::SeqCst);
        let mut state = self.dog.shared.lock();
        if let Some(at) = state
            .running
            .iter()
            .position(|w| Arc::ptr_eq(w, &self.watch))
        {
            state.running.swap_remove(at);
        }
    }
}

thread_local! {
    /// The task this thread runs now, for the signal handler: its watch and its code.
    static ACTIVE: Cell<(*const Watch, *const GuestCode)> =
        const { Cell::new((ptr::null(), ptr::null())) };
}

/// Where the handler sends a thread to trap: an `unreachable` in a module of
/// our own, which wasmtime knows as a trap site.
static TRAP_PC: AtomicUsize = AtomicUsize::new(0);

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod signals {
    use std::os::raw::{c_int, c_void};
    use std::sync::atomic::Ordering;
    use std::sync::OnceLock;

    use wasmtime::{Config, Engine, Module};

    use super::{GuestCode, Watch, ACTIVE, RUNNING, TRAP_PC};

    pub const SIGNAL: c_int = libc::SIGUSR2;
    const UD2: [u8; 2] = [0x0f, 0x0b];

    #[derive(Clone, Copy)]
    pub struct Thread(libc::pthread_t);

    impl Thread {
        pub fn current() -> Self {
            // SAFETY: always safe to call.
            Thread(unsafe { libc::pthread_self() })
        }

        pub fn signal(&self) {
            // SAFETY: callers guarantee the thread has not exited.
            unsafe { libc::pthread_kill(self.0, SIGNAL) };
        }
    }

    /// Finds the trap site and installs the handler, once per process.
    pub fn install() -> bool {
        static INSTALLED: OnceLock<Option<Module>> = OnceLock::new();
        INSTALLED
            .get_or_init(|| match trap_site() {
                Ok((module, pc)) => {
                    TRAP_PC.store(pc, Ordering::Release);
                    if set_handler() {
                        Some(module)
                    } else {
                        tracing::warn!("could not install the preemption signal handler");
                        None
                    }
                }
                Err(reason) => {
                    tracing::warn!("signal preemption unavailable: {reason}");
                    None
                }
            })
            .is_some()
    }

    /// Compiles a function that is only `unreachable` and finds its `ud2`.
    /// The module is kept for the life of the process so the site stays registered.
    fn trap_site() -> Result<(Module, usize), String> {
        let engine = Engine::new(&Config::new()).map_err(|e| e.to_string())?;
        let wasm = wat::parse_str(r#"(module (func (export "stop") unreachable))"#)
            .map_err(|e| e.to_string())?;
        let module = Module::new(&engine, wasm).map_err(|e| e.to_string())?;
        let function = module.functions().next().ok_or("no function compiled")?;
        let text = module.text();
        let body = text
            .get(function.offset..function.offset + function.len)
            .ok_or("function outside the text section")?;
        let mut sites = body
            .windows(UD2.len())
            .enumerate()
            .filter(|(_, bytes)| *bytes == UD2);
        let pc = match (sites.next(), sites.next()) {
            (Some((at, _)), None) => text.as_ptr() as usize + function.offset + at,
            _ => return Err("the trap function does not contain exactly one ud2".into()),
        };
        Ok((module, pc))
    }

    fn set_handler() -> bool {
        // SAFETY: a zeroed sigaction is valid; the handler below is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) = on_signal;
            action.sa_sigaction = handler as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(SIGNAL, &action, std::ptr::null_mut()) == 0
        }
    }

    /// Only atomics and reads: no locks, no allocation.
    extern "C" fn on_signal(_signal: c_int, _info: *mut libc::siginfo_t, context: *mut c_void) {
        let (watch, code) = ACTIVE.get();
        if watch.is_null() || code.is_null() {
            return;
        }
        // SAFETY: ACTIVE points at the watch and code of the task this thread
        // runs; both outlive it, and it is cleared before they go.
        let (watch, code): (&Watch, &GuestCode) = unsafe { (&*watch, &*code) };
        if watch.stop.load(Ordering::Acquire) == RUNNING {
            return;
        }
        // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler.
        let registers = unsafe { &mut (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        let pc = &mut registers[libc::REG_RIP as usize];
        if !code.contains(*pc as usize) {
            return;
        }
        *pc = TRAP_PC.load(Ordering::Acquire) as i64;
        watch.fired.store(true, Ordering::Release);
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod signals {
    #[derive(Clone, Copy)]
    pub struct Thread;

    impl Thread {
        pub fn current() -> Self {
            Thread
        }

        pub fn signal(&self) {}
    }

    pub fn install() -> bool {
        false
    }
}

use signals::Thread;

#[cfg(test)]
mod tests {
    use wasmgrid_protocol::{FailureKind, TaskLimits};

    use super::super::test_support::{test_task, SPIN};
    use super::super::{Executor, ExecutorOptions, Interruption};
    use super::*;

    fn executor(interruption: Interruption) -> Executor {
        Executor::with_options(ExecutorOptions {
            concurrency: 2,
            interruption,
            ..ExecutorOptions::default()
        })
        .unwrap()
    }

    fn limits(timeout_ms: u64) -> TaskLimits {
        TaskLimits {
            fuel: u64::MAX,
            timeout_ms,
            ..TaskLimits::default()
        }
    }

    #[test]
    fn a_spinning_task_times_out_and_the_next_one_runs() {
        for interruption in [Interruption::Auto, Interruption::Epoch] {
            let executor = executor(interruption);
            let (task, load) = test_task(&executor);
            let report = executor.run(&task, load, SPIN, &limits(20));
            let failure = report.outcome.unwrap_err();
            assert_eq!(
                failure.kind,
                FailureKind::Timeout,
                "{interruption:?}: {failure:?}"
            );
            let report = executor.run(&task, load, "[]", &limits(20));
            assert_eq!(report.outcome, Ok("1".into()), "{interruption:?}");
        }
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn this_platform_stops_tasks_by_signal() {
        assert_eq!(executor(Interruption::Auto).interruption(), "signal");
        assert_eq!(executor(Interruption::Epoch).interruption(), "epoch");
    }

    #[test]
    fn stops_on_two_threads_in_a_row_hit_only_the_task_they_stop() {
        let executor = executor(Interruption::Auto);
        let (task, load) = test_task(&executor);
        thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    for _ in 0..25 {
                        let report = executor.run(&task, load, SPIN, &limits(1));
                        assert_eq!(report.outcome.unwrap_err().kind, FailureKind::Timeout);
                        for _ in 0..20 {
                            let report = executor.run(&task, load, "[]", &limits(60_000));
                            assert_eq!(report.outcome, Ok("1".into()));
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn guest_code_merges_and_finds_addresses() {
        let code = GuestCode::from_ranges([(30, 40), (10, 20), (20, 25), (50, 50)].into_iter());
        assert_eq!(&*code.ranges, &[(10, 25), (30, 40)]);
        for (pc, inside) in [
            (9, false),
            (10, true),
            (24, true),
            (25, false),
            (29, false),
            (30, true),
            (39, true),
            (40, false),
            (50, false),
        ] {
            assert_eq!(code.contains(pc), inside, "{pc}");
        }
        assert!(!GuestCode::default().contains(0));
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn the_trap_site_is_found_on_this_platform() {
        assert!(signals::install());
        assert_ne!(TRAP_PC.load(Ordering::Acquire), 0);
    }
}
