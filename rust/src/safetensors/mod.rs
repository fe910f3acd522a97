//! The safetensors format: header parsing and validation, memory-mapped files,
//! and checkpoints made of one file or of shards with an index.

pub mod checkpoint;
pub mod dtype;
pub mod file;
pub mod header;

pub use checkpoint::{Checkpoint, Shard};
pub use dtype::Dtype;
pub use file::SafetensorsFile;
pub use header::{Header, TensorInfo, MAX_HEADER_LEN};
