//! esft-rs core: byte-bound work of Expert-Specialized Fine-Tuning.
//!
//! Everything outside `bindings` is plain Rust with no Python types, so the core
//! can be tested with `cargo test` and reused without an interpreter.

pub mod error;
pub mod expert_config;
pub mod inspect;
pub mod naming;
pub mod routing;
pub mod safetensors;

mod bindings;

pub use error::{Error, FormatError, Result};
