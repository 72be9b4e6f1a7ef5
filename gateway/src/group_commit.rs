//! Group commit: each caller queues an item, and whoever holds the turn takes every item
//! queued and writes them together (one transaction, one fsync); each caller gets its own
//! item's outcome. Under concurrency many callers share a commit instead of paying one
//! each. Used for stand-alone audit leaves and for pull pages.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{oneshot, OwnedMutexGuard};

pub struct GroupCommit<T, R> {
    queued: Mutex<Vec<(T, oneshot::Sender<R>)>>,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl<T, R> Default for GroupCommit<T, R> {
    fn default() -> Self {
        GroupCommit {
            queued: Mutex::new(Vec::new()),
            turn: Arc::default(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> GroupCommit<T, R> {
    /// Queues `item` and waits for its outcome. If this caller gets the turn with items
    /// queued, `write` is given all of them and must answer one outcome per item, in order.
    /// The writing runs on a task of its own, so a caller that goes away (a client hanging
    /// up) cannot abandon a commit the others wait for. `None` if the write answered fewer
    /// outcomes than items or panicked.
    pub async fn submit<F, Fut>(&self, item: T, write: F) -> Option<R>
    where
        F: FnOnce(Vec<T>) -> Fut,
        Fut: Future<Output = Vec<R>> + Send + 'static,
    {
        let (reply, mut outcome) = oneshot::channel();
        self.queue().push((item, reply));
        // Whichever comes first: the outcome (an earlier holder of the turn wrote the item)
        // or the turn. Waiting for the turn after the outcome came would line callers up
        // behind each other and leave each holder little to write.
        let turn = tokio::select! {
            biased;
            done = &mut outcome => return done.ok(),
            turn = self.turn.clone().lock_owned() => turn,
        };
        let group = std::mem::take(&mut *self.queue());
        if group.is_empty() {
            // An earlier holder of the turn took this caller's item.
            drop(turn);
        } else {
            let (items, replies): (Vec<T>, Vec<_>) = group.into_iter().unzip();
            let writing = write(items);
            tokio::spawn(async move {
                let _turn = turn;
                for (reply, outcome) in replies.into_iter().zip(writing.await) {
                    // A caller that went away learns nothing; its item is written all the same.
                    let _ = reply.send(outcome);
                }
            });
        }
        outcome.await.ok()
    }

    /// Items queued now.
    pub fn waiting(&self) -> usize {
        self.queue().len()
    }

    /// Holds the turn until the guard is dropped, so items gather (tests use it to group
    /// items deterministically).
    pub async fn hold(&self) -> OwnedMutexGuard<()> {
        self.turn.clone().lock_owned().await
    }

    fn queue(&self) -> MutexGuard<'_, Vec<(T, oneshot::Sender<R>)>> {
        // A panic elsewhere while it was held leaves the list itself intact.
        self.queued
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn items_queued_while_the_turn_is_held_are_written_together_in_order() {
        let group: Arc<GroupCommit<u32, (u32, usize)>> = Arc::default();
        let held = group.hold().await;
        let mut callers = Vec::new();
        for n in 0..5u32 {
            let group = group.clone();
            callers.push(tokio::spawn(async move {
                group
                    .submit(n, |items| async move {
                        let size = items.len();
                        items.into_iter().map(|i| (i * 10, size)).collect()
                    })
                    .await
            }));
        }
        while group.waiting() < 5 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(held);
        for (n, caller) in callers.into_iter().enumerate() {
            let (value, size) = caller.await.expect("caller").expect("outcome");
            assert_eq!(
                value,
                n as u32 * 10,
                "each caller gets its own item's outcome"
            );
            assert_eq!(size, 5, "all five were written in one group");
        }
        assert_eq!(group.waiting(), 0);
    }

    #[tokio::test]
    async fn a_write_that_answers_too_few_outcomes_gives_none_not_a_hang() {
        let group: GroupCommit<u32, u32> = GroupCommit::default();
        let outcome = group.submit(1, |_| async { Vec::new() }).await;
        assert_eq!(outcome, None);
        let outcome = group.submit(2, |items| async move { items }).await;
        assert_eq!(
            outcome,
            Some(2),
            "the next caller is not blocked by the last"
        );
    }
}
