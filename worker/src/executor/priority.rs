//! How much a slot thread defers to everything else on the volunteer's PC:
//! the scheduling priority its tasks run at.

pub use wasmgrid_protocol::wire::SlotPriority;

/// Sets the calling thread's priority. An unprivileged thread can lower
/// its own priority but never raise it again.
pub fn apply_to_this_thread(priority: SlotPriority) -> std::io::Result<()> {
    match priority {
        SlotPriority::Normal => Ok(()),
        SlotPriority::Low => lower_this_thread(),
        SlotPriority::Idle => idle_this_thread(),
    }
}

#[cfg(target_os = "linux")]
fn lower_this_thread() -> std::io::Result<()> {
    // On Linux a nice value belongs to a thread: a thread id sets only it.
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority only reads its integer arguments.
    let done = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(target_os = "linux")]
fn idle_this_thread() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    let done = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_thread() -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "per-thread priority is only set on Linux",
    ))
}

#[cfg(not(target_os = "linux"))]
fn idle_this_thread() -> std::io::Result<()> {
    lower_this_thread()
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn on_a_new_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn idle_sets_sched_idle_on_this_thread_only() {
        let policy = on_a_new_thread(|| {
            apply_to_this_thread(SlotPriority::Idle).unwrap();
            // SAFETY: pid 0 is the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        });
        assert_eq!(policy, libc::SCHED_IDLE);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }

    #[test]
    fn low_sets_nice_19_on_this_thread_only() {
        let nice = on_a_new_thread(|| {
            apply_to_this_thread(SlotPriority::Low).unwrap();
            // SAFETY: gettid has no preconditions; getpriority reads integers.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
        });
        assert_eq!(nice, 19);
        // SAFETY: as above.
        let mine = unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        assert_ne!(mine, 19);
    }
}
