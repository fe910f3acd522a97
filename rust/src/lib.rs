//! esft-rs core: byte-bound work of Expert-Specialized Fine-Tuning.
//!
//! Everything outside `bindings` is plain Rust with no Python types, so the core
//! can be tested with `cargo test` and reused without an interpreter.

pub mod adapter;
pub mod copy;
pub mod error;
pub mod expert_config;
pub mod fingerprint;
pub mod fp8;
pub mod inspect;
pub mod merge;
pub mod naming;
pub mod routing;
pub mod progress;
pub mod safetensors;
pub mod split;
pub mod staging;

mod bindings;
#[cfg(test)]
mod fuzzing;

pub use error::{Error, FormatError, Result};
