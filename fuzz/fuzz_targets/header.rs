//! Fuzzes the safetensors header parser: any bytes must give a header or a
//! typed error, never a panic; an accepted header must satisfy the invariants
//! that merge relies on (contiguous offsets covering the data section).
#![no_main]

use esft_core::safetensors::header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = header::parse(data, data.len() as u64) {
        let mut expected = 0;
        for t in &h.tensors {
            assert_eq!(t.start, expected);
            assert!(t.end >= t.start);
            expected = t.end;
        }
        assert_eq!(h.data_start() + h.data_len(), data.len() as u64);
    }
});
