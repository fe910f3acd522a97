//! The safetensors format: header parsing and validation, files read by offset,
//! checkpoints made of one file or of shards with an index, and new headers;
//! rows read by offset into a caller's buffer (`rows`), and files written one
//! tensor at a time (`stream`).

pub mod checkpoint;
pub mod dtype;
pub mod file;
pub mod header;
pub mod rows;
pub mod stream;
pub mod writer;

pub use checkpoint::{Checkpoint, Shard};
pub use dtype::Dtype;
pub use file::SafetensorsFile;
pub use header::{Header, TensorInfo, MAX_HEADER_LEN};
pub use rows::FileReader;
pub use stream::{StreamWriter, TensorSpec};

/// How a tensor splits into independently replaceable units (see
/// `naming::expert_units`): (units, bytes per unit). Merge paints and split
/// extracts these units.
pub fn expert_units(t: &TensorInfo) -> (u32, u64) {
    crate::naming::expert_units(&t.name, &t.shape, t.nbytes())
}
