//! The shim's one way to take a lock: a lock a panicking thread poisoned is
//! still taken (its data stays consistent between statements), so one
//! panic does not wedge every later request.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
