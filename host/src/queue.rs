//! The bounded queue between decode and the plugin.
//!
//! A live source cannot be slowed down, so when the plugin falls behind the queue drops the
//! *oldest* frame: a tracker is better served by the newest picture than by a stale backlog.
//! Each drop is counted by the caller (`frames_dropped`). A source that can wait (a capture
//! file replayed as fast as possible) uses [`FrameQueue::push_wait`] instead and loses nothing.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// A fixed-capacity multi-producer, single-consumer queue.
///
/// Holds at most `capacity` items (at least 1). Past that, [`push`](Self::push) evicts the
/// oldest item and hands it back to the caller, who counts it.
pub struct FrameQueue<T> {
    state: Mutex<State<T>>,
    /// Wakes the consumer when an item arrives or the queue closes.
    item_ready: Notify,
    /// Wakes producers waiting in `push_wait` when the consumer takes an item.
    room_ready: Notify,
}

struct State<T> {
    items: VecDeque<T>,
    capacity: usize,
    closed: bool,
}

impl<T> FrameQueue<T> {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity),
                capacity,
                closed: false,
            }),
            item_ready: Notify::new(),
            room_ready: Notify::new(),
        }
    }

    /// Adds an item; when full, removes and returns the oldest one. After `close` the item is
    /// handed straight back.
    pub fn push(&self, item: T) -> Option<T> {
        let evicted = {
            let mut state = self.state.lock().expect("queue lock");
            if state.closed {
                return Some(item);
            }
            let evicted = if state.items.len() >= state.capacity {
                state.items.pop_front()
            } else {
                None
            };
            state.items.push_back(item);
            evicted
        };
        self.item_ready.notify_one();
        evicted
    }

    /// Adds an item, waiting for room instead of evicting. Returns the item back if the queue
    /// was closed meanwhile.
    pub async fn push_wait(&self, item: T) -> Result<(), T> {
        loop {
            let room = self.room_ready.notified();
            {
                let mut state = self.state.lock().expect("queue lock");
                if state.closed {
                    return Err(item);
                }
                if state.items.len() < state.capacity {
                    state.items.push_back(item);
                    drop(state);
                    self.item_ready.notify_one();
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Takes the oldest item, waiting for one. `None` once the queue is closed and drained.
    pub async fn pop(&self) -> Option<T> {
        loop {
            let ready = self.item_ready.notified();
            {
                let mut state = self.state.lock().expect("queue lock");
                if let Some(item) = state.items.pop_front() {
                    drop(state);
                    self.room_ready.notify_one();
                    return Some(item);
                }
                if state.closed {
                    return None;
                }
            }
            ready.await;
        }
    }

    /// No more items will be accepted; the consumer drains what is left, then sees `None`.
    pub fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.item_ready.notify_waiters();
        self.item_ready.notify_one();
        self.room_ready.notify_waiters();
    }

    /// Closes the queue and discards what it holds, returning how many items were discarded.
    pub fn close_and_clear(&self) -> usize {
        let discarded = {
            let mut state = self.state.lock().expect("queue lock");
            state.closed = true;
            std::mem::take(&mut state.items).len()
        };
        self.item_ready.notify_waiters();
        self.item_ready.notify_one();
        self.room_ready.notify_waiters();
        discarded
    }

    pub fn len(&self) -> usize {
        self.state.lock().expect("queue lock").items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn full_queue_drops_the_oldest() {
        let queue = FrameQueue::new(2);
        assert_eq!(queue.push(1), None);
        assert_eq!(queue.push(2), None);
        assert_eq!(queue.push(3), Some(1));
        assert_eq!(queue.push(4), Some(2));
        queue.close();
        assert_eq!(queue.pop().await, Some(3));
        assert_eq!(queue.pop().await, Some(4));
        assert_eq!(queue.pop().await, None);
    }

    #[tokio::test]
    async fn push_wait_loses_nothing_behind_a_slow_consumer() {
        let queue = Arc::new(FrameQueue::new(1));
        let producer = {
            let queue = queue.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    queue.push_wait(i).await.expect("open");
                }
                queue.close();
            })
        };
        let mut seen = Vec::new();
        while let Some(i) = queue.pop().await {
            seen.push(i);
            tokio::task::yield_now().await;
        }
        producer.await.unwrap();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn closed_queue_refuses_and_wakes_the_consumer() {
        let queue = Arc::new(FrameQueue::<u32>::new(4));
        let consumer = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.pop().await })
        };
        tokio::task::yield_now().await;
        queue.close();
        assert_eq!(consumer.await.unwrap(), None);
        assert_eq!(queue.push(9), Some(9));
        assert_eq!(queue.push_wait(9).await, Err(9));
    }

    #[tokio::test]
    async fn close_and_clear_discards() {
        let queue = FrameQueue::new(4);
        queue.push(1);
        queue.push(2);
        assert_eq!(queue.close_and_clear(), 2);
        assert_eq!(queue.pop().await, None);
    }
}
