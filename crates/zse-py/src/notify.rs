//! Wake-up hooks for Python callers, called on a thread of their own.
//!
//! The engine calls a request's hook after each event it sends. Calling Python
//! takes the GIL, and an asyncio server holds the GIL most of the time it runs:
//! made on the engine thread, each call waited for it (on average 0.27 ms per
//! event serving 8 streams, timed around the call). So the engine thread only
//! queues the hook here, which never blocks, and one notifier thread for the
//! process makes the calls, each hook once per batch it finds queued, under one
//! GIL hold.
//!
//! At interpreter exit the thread must not be waiting for the GIL: CPython ends a
//! thread that takes the GIL while it finalizes, which would abort the process
//! from inside Rust. An `atexit` hook (`close`, registered at import) waits for
//! the call in progress and stops all later ones.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;

use pyo3::prelude::*;

type Hook = Arc<Py<PyAny>>;

struct Notifier {
    tx: Sender<Hook>,
    /// True once the interpreter exits; held while the thread calls Python.
    closed: Arc<Mutex<bool>>,
}

static NOTIFIER: OnceLock<std::io::Result<Notifier>> = OnceLock::new();

fn notifier() -> PyResult<&'static Notifier> {
    let started = NOTIFIER.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        let closed = Arc::new(Mutex::new(false));
        let gate = closed.clone();
        thread::Builder::new()
            .name("zse-notify".into())
            .spawn(move || run(rx, &gate))?;
        Ok(Notifier { tx, closed })
    });
    started.as_ref().map_err(|e| {
        pyo3::exceptions::PyOSError::new_err(format!("cannot start the notifier thread: {e}"))
    })
}

/// The engine-side hook for `callback`: queues it for the notifier thread.
pub(crate) fn hook(callback: &Hook) -> PyResult<Box<dyn Fn() + Send>> {
    let tx = notifier()?.tx.clone();
    let callback = callback.clone();
    // The thread never ends, so a send cannot fail.
    Ok(Box::new(move || drop(tx.send(callback.clone()))))
}

/// Stops the notifier for good, after the call it may be making (`atexit`).
#[pyfunction]
pub(crate) fn close(py: Python<'_>) {
    if let Some(Ok(n)) = NOTIFIER.get() {
        // Without the GIL, so that a call in progress can finish.
        py.detach(|| *n.closed.lock().unwrap_or_else(|e| e.into_inner()) = true);
    }
}

fn run(rx: Receiver<Hook>, closed: &Mutex<bool>) {
    while let Ok(first) = rx.recv() {
        let batch = drain_distinct(first, &rx);
        let closed = closed.lock().unwrap_or_else(|e| e.into_inner());
        if *closed {
            // Nobody waits any more; the references go to PyO3's deferred pool.
            continue;
        }
        Python::attach(|py| {
            for hook in &batch {
                // The callback's errors are the caller's business, never the engine's.
                if let Err(e) = hook.call0(py) {
                    e.write_unraisable(py, None);
                }
            }
            // The batch's references are released here, while the GIL is held.
            drop(batch);
        });
    }
}

/// `first` and whatever else is queued, each hook once, in the order first queued.
fn drain_distinct<T>(first: Arc<T>, rx: &Receiver<Arc<T>>) -> Vec<Arc<T>> {
    let mut batch = vec![first];
    while let Ok(next) = rx.try_recv() {
        if !batch.iter().any(|h| Arc::ptr_eq(h, &next)) {
            batch.push(next);
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_holds_each_queued_hook_once_in_first_order() {
        let (tx, rx) = mpsc::channel();
        let (a, b, c) = (Arc::new(1), Arc::new(1), Arc::new(2));
        for h in [&b, &a, &b, &c, &a] {
            tx.send(h.clone()).unwrap();
        }
        let first = rx.recv().unwrap();
        let batch = drain_distinct(first, &rx);
        assert_eq!(batch.len(), 3);
        assert!(Arc::ptr_eq(&batch[0], &b));
        assert!(Arc::ptr_eq(&batch[1], &a));
        assert!(Arc::ptr_eq(&batch[2], &c));
        assert!(rx.try_recv().is_err(), "the queue is drained");
    }
}
