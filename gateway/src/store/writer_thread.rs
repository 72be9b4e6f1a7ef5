//! SQLite's group commits run on a thread of their own. A write transaction is a chain of
//! statements, each handed to sqlx's connection thread and answered back; on the shared
//! runtime every answer waited for a worker thread busy with pull pages being fetched,
//! parsed and sealed, while the single writer (and every page queued behind it) stood
//! still. On this thread nothing else competes, so the next statement goes out as soon as
//! the last one is answered. PostgreSQL has no single writer and needs none.

use std::future::Future;

use crate::error::{Error, Result};

/// A write that cannot reach the writer thread, or whose task panicked, fails as a database
/// worker that crashed would: the caller sees a database error and nothing is committed.
fn crashed() -> Error {
    Error::Database(sqlx::Error::WorkerCrashed)
}

pub(crate) struct WriterThread(Option<tokio::runtime::Runtime>);

impl WriterThread {
    pub(crate) fn start() -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sqlite-writer")
            .enable_all()
            .build()
            .map_err(|e| Error::io("sqlite-writer thread", e))?;
        Ok(WriterThread(Some(runtime)))
    }

    /// Runs `work` to its end on the writer thread. It runs to its end even if the caller
    /// goes away (as a commit others wait for must).
    pub(crate) async fn run<F>(&self, work: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let Some(runtime) = &self.0 else {
            return Err(crashed());
        };
        runtime.spawn(work).await.map_err(|_| crashed())
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        // Dropping a runtime from async code, or from its own thread (the last holder of
        // the database may be a write on it), would panic: it is let go from a thread of
        // its own, without waiting for it.
        if let Some(runtime) = self.0.take() {
            let _ = std::thread::Builder::new()
                .name("sqlite-writer-stop".into())
                .spawn(move || runtime.shutdown_background());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_writer_thread_and_its_output_comes_back() {
        let thread = WriterThread::start().expect("start");
        let name = thread
            .run(async { std::thread::current().name().map(str::to_string) })
            .await
            .expect("run");
        assert_eq!(name.as_deref(), Some("sqlite-writer"));
        assert_ne!(
            std::thread::current().name(),
            Some("sqlite-writer"),
            "the caller is elsewhere"
        );
    }

    #[tokio::test]
    async fn a_panicking_write_is_a_database_error_and_the_thread_goes_on() {
        let thread = WriterThread::start().expect("start");
        let failed = thread
            .run(async {
                if std::hint::black_box(true) {
                    panic!("a write that panics");
                }
            })
            .await;
        assert!(matches!(
            failed,
            Err(Error::Database(sqlx::Error::WorkerCrashed))
        ));
        assert_eq!(thread.run(async { 7 }).await.expect("still running"), 7);
    }

    #[tokio::test]
    async fn it_can_be_dropped_from_async_code_and_from_its_own_thread() {
        let thread = std::sync::Arc::new(WriterThread::start().expect("start"));
        let held = thread.clone();
        // The last reference goes away on the writer thread itself.
        drop(thread);
        let (sender, received) = tokio::sync::oneshot::channel();
        let handle = match &held.0 {
            Some(runtime) => runtime.handle().clone(),
            None => panic!("running"),
        };
        handle.spawn(async move {
            // A panic here would drop the sender unsent, and the wait below would fail.
            drop(held);
            let _ = sender.send(());
        });
        received
            .await
            .expect("dropped on its own thread without a panic");
        // And it stopped: its handle takes no more work.
        let mut stopped = false;
        for _ in 0..200 {
            if handle.spawn(async {}).await.is_err() {
                stopped = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(stopped, "the writer thread stopped once dropped");
        // And one dropped here, in async code.
        drop(WriterThread::start().expect("start"));
    }
}
