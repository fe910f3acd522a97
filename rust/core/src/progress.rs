//! Progress, warnings and cancellation shared between a long job and whoever
//! watches it (the Python bindings poll it from the main thread, so the job
//! itself never needs the GIL).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

#[derive(Debug, Default)]
pub struct Control {
    done: AtomicU64,
    total: AtomicU64,
    cancelled: AtomicBool,
    stage: Mutex<String>,
    warnings: Mutex<Vec<String>>,
}

impl Control {
    /// Starts a named stage of `total` bytes (or units) of work.
    pub fn stage(&self, name: &str, total: u64) {
        if let Ok(mut s) = self.stage.lock() {
            name.clone_into(&mut s);
        }
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// Records `n` more units done; fails once the job has been cancelled, so
    /// that workers stop at their next step.
    pub fn advance(&self, n: u64) -> Result<()> {
        self.done.fetch_add(n, Ordering::Relaxed);
        self.check()
    }

    pub fn check(&self) -> Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn warn(&self, message: String) {
        if let Ok(mut w) = self.warnings.lock() {
            w.push(message);
        }
    }

    /// (stage, done, total) right now.
    pub fn snapshot(&self) -> (String, u64, u64) {
        let stage = self.stage.lock().map(|s| s.clone()).unwrap_or_default();
        (
            stage,
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }

    /// Warnings raised since the last call.
    pub fn take_warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    }
}
