//! The writer's inbox: commands in order, with a wakeup only when the writer
//! has to act. Lazy changes that arrive while the writer holds a lazy batch
//! join it without waking the thread: one wakeup per batch, not per task.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::Command;

pub(in crate::store) struct Inbox {
    state: Mutex<State>,
    wake: Condvar,
}

struct State {
    queue: VecDeque<Command>,
    /// Commands in `queue` that are not lazy.
    urgent: usize,
    closed: bool,
    waiting: Waiting,
}

/// What the writer, if asleep, wants to be woken for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Nothing,
    Any,
    Urgent,
}

pub(super) enum Received {
    Command(Command),
    Empty,
    Closed,
}

impl Inbox {
    pub(in crate::store) fn new() -> Self {
        Inbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                urgent: 0,
                closed: false,
                waiting: Waiting::Nothing,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The lock guards plain data that every holder leaves consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `command`; gives it back once the inbox is closed.
    pub(in crate::store) fn send(&self, command: Command) -> Result<(), Command> {
        let urgent = !command.is_lazy();
        let mut state = self.lock();
        if state.closed {
            return Err(command);
        }
        state.queue.push_back(command);
        state.urgent += usize::from(urgent);
        let wake = match state.waiting {
            Waiting::Nothing => false,
            Waiting::Any => true,
            Waiting::Urgent => urgent,
        };
        if wake {
            state.waiting = Waiting::Nothing;
            drop(state);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// No more commands: the writer takes what is queued, then stops.
    pub(in crate::store) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// The next command, waiting as long as it takes; `None` once closed
    /// and empty.
    pub(super) fn recv(&self) -> Option<Command> {
        let mut state = self.lock();
        loop {
            if let Some(command) = state.pop() {
                return Some(command);
            }
            if state.closed {
                return None;
            }
            state.waiting = Waiting::Any;
            state = self
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The next command if one is queued.
    pub(super) fn try_recv(&self) -> Received {
        self.lock().take()
    }

    /// The next command once one that is not lazy is queued, or once
    /// `until` has passed, whichever is first.
    pub(super) fn recv_urgent_before(&self, until: Instant) -> Received {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            if state.urgent > 0 || state.closed || now >= until {
                return state.take();
            }
            state.waiting = Waiting::Urgent;
            state = self
                .wake
                .wait_timeout(state, until - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl State {
    fn pop(&mut self) -> Option<Command> {
        self.waiting = Waiting::Nothing;
        let command = self.queue.pop_front()?;
        if !command.is_lazy() {
            self.urgent -= 1;
        }
        Some(command)
    }

    fn take(&mut self) -> Received {
        match self.pop() {
            Some(command) => Received::Command(command),
            None if self.closed => Received::Closed,
            None => Received::Empty,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::Change;
    use super::*;

    fn urgent() -> Command {
        Command::Changes(vec![Change::Draining {
            worker: 1,
            draining: true,
        }])
    }

    fn lazy() -> Command {
        Command::Changes(vec![Change::Heartbeat {
            worker: 1,
            load: Default::default(),
            now_ms: 0,
        }])
    }

    #[test]
    fn commands_come_out_in_order_and_then_closed() {
        let inbox = Inbox::new();
        assert!(inbox.send(lazy()).is_ok());
        assert!(inbox.send(urgent()).is_ok());
        inbox.close();
        assert!(inbox.send(lazy()).is_err());
        assert!(matches!(inbox.recv(), Some(c) if c.is_lazy()));
        assert!(matches!(inbox.recv(), Some(c) if !c.is_lazy()));
        assert!(inbox.recv().is_none());
        assert!(matches!(inbox.try_recv(), Received::Closed));
    }

    #[test]
    fn a_lazy_wait_ends_at_its_deadline_or_at_an_urgent_command() {
        let inbox = Arc::new(Inbox::new());
        assert!(inbox.send(lazy()).is_ok());
        // Lazy only: held until the deadline.
        let until = Instant::now() + Duration::from_millis(20);
        assert!(matches!(
            inbox.recv_urgent_before(until),
            Received::Command(_)
        ));
        assert!(Instant::now() >= until);
        assert!(matches!(
            inbox.recv_urgent_before(Instant::now()),
            Received::Empty
        ));

        // An urgent command from another thread ends the wait long before it.
        let sender = inbox.clone();
        let sent = std::thread::spawn(move || {
            assert!(sender.send(lazy()).is_ok());
            std::thread::sleep(Duration::from_millis(5));
            assert!(sender.send(urgent()).is_ok());
        });
        let far = Instant::now() + Duration::from_secs(600);
        assert!(matches!(inbox.recv_urgent_before(far), Received::Command(c) if c.is_lazy()));
        assert!(matches!(inbox.recv_urgent_before(far), Received::Command(c) if !c.is_lazy()));
        sent.join().unwrap();
    }
}
