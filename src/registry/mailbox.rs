//! A connection's bounded queue of control messages from the admin API, kept inside its
//! registry entry.
//!
//! A tokio mpsc channel cost every connection about 1.6 KB (its first block holds 32 slots,
//! allocated when the channel is made, plus the channel's own state), for messages that most
//! connections never get. The mailbox is a lock and an empty `VecDeque` (no allocation until a
//! message comes) beside a waker, in the entry the registry allocates anyway. The relay checks
//! an atomic count on each wake-up and takes the lock only when something is queued; senders
//! (the admin API) take it for each message.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use super::{Control, Entry, CONTROL_CAPACITY};

/// The queue and the relay's waker.
#[derive(Debug, Default)]
pub(super) struct Mailbox {
    queue: Mutex<VecDeque<Control>>,
    /// Messages in `queue`, read without the lock.
    queued: AtomicUsize,
    /// Set when the relay stopped reading: further messages are refused.
    closed: AtomicBool,
    waker: AtomicWaker,
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// [`CONTROL_CAPACITY`] messages wait already.
    Full,
    /// The relay no longer reads (the connection is closing).
    Closed,
}

impl Mailbox {
    /// Queues `control` without waiting and wakes the relay.
    pub(super) fn push(&self, control: Control) -> Result<(), Refused> {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if self.closed.load(Ordering::Acquire) {
                return Err(Refused::Closed);
            }
            if queue.len() >= CONTROL_CAPACITY {
                return Err(Refused::Full);
            }
            queue.push_back(control);
            self.queued.store(queue.len(), Ordering::Release);
        }
        self.waker.wake();
        Ok(())
    }

    fn close(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, Ordering::Release);
        // Free what was queued now rather than with the entry.
        *queue = VecDeque::new();
        self.queued.store(0, Ordering::Release);
    }
}

/// The relay's end of a connection's mailbox. Dropping it refuses further messages.
#[derive(Debug)]
pub struct ControlReceiver {
    entry: Arc<Entry>,
}

impl ControlReceiver {
    pub(super) fn new(entry: Arc<Entry>) -> ControlReceiver {
        ControlReceiver { entry }
    }

    /// The next control message, or `Pending` (the task is woken when one comes). Never
    /// `Ready(None)`: the mailbox lives as long as this receiver.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Control>> {
        if let Some(control) = self.try_recv() {
            return Poll::Ready(Some(control));
        }
        self.entry.mailbox.waker.register(cx.waker());
        // A message pushed before the registration woke nobody: look again.
        match self.try_recv() {
            Some(control) => Poll::Ready(Some(control)),
            None => Poll::Pending,
        }
    }

    /// Waits for the next control message (tests and tools; the relay polls).
    pub async fn recv(&mut self) -> Option<Control> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// The next control message if one is queued; the lock is taken only then.
    pub fn try_recv(&mut self) -> Option<Control> {
        let mailbox = &self.entry.mailbox;
        if mailbox.queued.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut queue = mailbox.queue.lock().unwrap_or_else(|p| p.into_inner());
        let next = queue.pop_front();
        mailbox.queued.store(queue.len(), Ordering::Release);
        next
    }
}

impl Drop for ControlReceiver {
    fn drop(&mut self) {
        self.entry.mailbox.close();
    }
}
