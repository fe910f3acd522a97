//! esft-core: the byte-bound work of Expert-Specialized Fine-Tuning (ESFT) of
//! Mixture-of-Experts checkpoints.
//!
//! Plain Rust with no Python types, so the core can be tested with `cargo test`
//! and reused without an interpreter; `rust/python` (the `esft_rs._core`
//! extension) is a thin binding over it.
//!
//! - [`safetensors`]: header parsing and validation (the reference's checks),
//!   files read by offset, sharded checkpoints, new headers.
//! - [`naming`]: what each tensor of an MoE checkpoint is, and the MoE layout.
//! - [`expert_config`]: the official ESFT expert config.
//! - [`adapter`], [`fingerprint`]: adapters and the base they were trained from.
//! - [`merge`] (adapters into a base; see its example), [`split`] (the inverse),
//!   [`inspect`], [`fp8`] (block-FP8 scales and quantisation).
//! - [`routing`]: counting per-token routing records, the stats file, official logs.
//! - [`staging`], [`copy`], [`progress`]: outputs that appear only when complete,
//!   in-kernel copies, progress and cancellation.
//!
//! Every function returns [`Result`] with a typed [`Error`] that names the file.

pub mod adapter;
pub mod copy;
pub mod error;
pub mod expert_config;
pub mod fingerprint;
pub mod fp8;
pub mod inspect;
pub mod lora;
pub mod merge;
pub mod naming;
pub mod routing;
pub mod progress;
pub mod safetensors;
pub mod split;
pub mod staging;

#[cfg(test)]
mod fuzzing;

#[cfg(test)]
mod test_support;

pub use error::{Error, FormatError, Result};
