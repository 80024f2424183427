//! The outgoing queue of one connection: many producers (the connection's own commands,
//! every room it joined, the hub), one consumer (the connection's writer task).
//!
//! Hand-written instead of `tokio::sync::mpsc` because measurement said so: a tokio channel
//! allocates a block of 32 slots (about 1.9 KB here) as soon as it exists, and an idle
//! viewer must cost a few KiB in all. This queue allocates only while frames wait, and the
//! writer takes everything waiting in one lock. It must never block a producer: `try_send`
//! either queues or reports `Full` at once.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

use crate::protocol::Frame;

/// Frames kept allocated by an empty queue (more is released after a burst).
const RETAIN: usize = 64;

struct State {
    items: VecDeque<Frame>,
    senders: usize,
    receiver: bool,
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
    cap: usize,
}

impl Shared {
    // A std mutex: held for a push or a swap, never across an `.await`. A poisoned lock
    // only means a panic elsewhere while pushing; the queue itself is still whole.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// `cap` frames are waiting: the consumer is too slow.
    Full,
    /// The writer is gone.
    Closed,
}

/// The producing side; clone it for each producer.
pub struct Sender {
    shared: Arc<Shared>,
}

/// The consuming side (the writer task).
pub struct Receiver {
    shared: Arc<Shared>,
}

/// A queue that holds at most `cap` frames waiting (the writer may hold one more batch of at
/// most `cap` while it writes).
pub fn queue(cap: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            senders: 1,
            receiver: true,
        }),
        notify: Notify::new(),
        cap: cap.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

impl Sender {
    /// Queues `frame` without waiting.
    pub fn try_send(&self, frame: Frame) -> Result<(), TrySendError> {
        let mut s = self.shared.lock();
        if !s.receiver {
            return Err(TrySendError::Closed);
        }
        if s.items.len() >= self.shared.cap {
            return Err(TrySendError::Full);
        }
        let was_empty = s.items.is_empty();
        s.items.push_back(frame);
        drop(s);
        if was_empty {
            self.shared.notify.notify_one();
        }
        Ok(())
    }

    pub fn is_closed(&self) -> bool {
        !self.shared.lock().receiver
    }
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.senders -= 1;
        let last = s.senders == 0;
        drop(s);
        if last {
            self.shared.notify.notify_one();
        }
    }
}

impl Receiver {
    /// Waits for frames and moves every waiting frame into `batch` (which must be empty).
    /// Returns false once every sender is gone and nothing waits.
    pub async fn recv_batch(&mut self, batch: &mut VecDeque<Frame>) -> bool {
        debug_assert!(batch.is_empty());
        loop {
            let notified = self.shared.notify.notified();
            {
                let mut s = self.shared.lock();
                if !s.items.is_empty() {
                    // Swap buffers: the writer takes the frames, the queue keeps the
                    // writer's empty buffer; neither allocates in steady state.
                    std::mem::swap(&mut s.items, batch);
                    if s.items.capacity() > RETAIN {
                        s.items = VecDeque::new();
                    }
                    return true;
                }
                if s.senders == 0 {
                    return false;
                }
            }
            notified.await;
        }
    }

    /// Frames waiting now.
    pub fn len(&self) -> usize {
        self.shared.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.receiver = false;
        s.items.clear();
    }
}

/// Releases a writer batch buffer that grew large during a burst.
pub fn trim(batch: &mut VecDeque<Frame>) {
    if batch.capacity() > RETAIN {
        *batch = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::Message;

    fn f(s: &str) -> Frame {
        Message::Text(s.to_string().into())
    }

    #[tokio::test]
    async fn frames_arrive_in_order_in_batches() {
        let (tx, mut rx) = queue(8);
        for i in 0..5 {
            tx.try_send(f(&i.to_string())).expect("room");
        }
        let mut batch = VecDeque::new();
        assert!(rx.recv_batch(&mut batch).await);
        let got: Vec<String> = batch
            .drain(..)
            .map(|m| m.to_text().unwrap_or("").to_string())
            .collect();
        assert_eq!(got, ["0", "1", "2", "3", "4"]);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let (tx, _rx) = queue(2);
        assert_eq!(tx.try_send(f("a")), Ok(()));
        assert_eq!(tx.try_send(f("b")), Ok(()));
        assert_eq!(tx.try_send(f("c")), Err(TrySendError::Full));
    }

    #[tokio::test]
    async fn the_receiver_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = queue(4);
        let tx2 = tx.clone();
        tx2.try_send(f("last")).expect("room");
        drop(tx);
        drop(tx2);
        let mut batch = VecDeque::new();
        assert!(rx.recv_batch(&mut batch).await, "queued frames come first");
        batch.clear();
        assert!(!rx.recv_batch(&mut batch).await);
    }

    #[tokio::test]
    async fn senders_see_a_closed_receiver() {
        let (tx, rx) = queue(4);
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(f("x")), Err(TrySendError::Closed));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken() {
        let (tx, mut rx) = queue(4);
        let h = tokio::spawn(async move {
            let mut batch = VecDeque::new();
            rx.recv_batch(&mut batch).await && batch.len() == 1
        });
        tokio::task::yield_now().await;
        tx.try_send(f("wake")).expect("room");
        assert!(h.await.expect("task"));
    }
}
