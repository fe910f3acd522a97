//! The only module that touches Python: exposes the core as `esft_rs._core`,
//! maps core errors onto the Python exception hierarchy, and releases the GIL
//! around all file and compute work.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError};
use pyo3::prelude::*;

use crate::error::Error;
use crate::expert_config::ExpertConfig;
use crate::{inspect, naming};

create_exception!(_core, EsftError, PyException, "Base class of all esft-rs errors.");
create_exception!(
    _core,
    InvalidFileError,
    EsftError,
    "A file (safetensors, index, config, data) is malformed or says something impossible."
);
create_exception!(
    _core,
    MismatchError,
    EsftError,
    "Inputs that are each valid do not fit together (adapter vs base, layers, shapes)."
);

fn to_py(err: Error) -> PyErr {
    match err {
        // Keep the OSError subclass (FileNotFoundError, PermissionError, ...).
        Error::Io { path, source } => std::io::Error::new(
            source.kind(),
            format!("{}: {}", path.display(), source),
        )
        .into(),
        e @ (Error::Format { .. } | Error::Invalid { .. }) => InvalidFileError::new_err(e.to_string()),
        e @ Error::Mismatch(_) => MismatchError::new_err(e.to_string()),
    }
}

/// Inspects a safetensors file, checkpoint directory or adapter; returns JSON.
#[pyfunction]
fn inspect_json(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    let report = py.detach(|| inspect::inspect(&path)).map_err(to_py)?;
    serde_json::to_string(&report).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Classifies a checkpoint tensor name: (kind, layer, expert).
#[pyfunction]
fn classify_tensor(name: &str) -> (&'static str, Option<u32>, Option<u32>) {
    let role = naming::classify(name);
    let expert = match role {
        naming::Role::RoutedExpert { expert, .. } => Some(expert),
        _ => None,
    };
    (role.kind(), role.layer(), expert)
}

/// Maps legacy official-adapter names (`layers.L...`) to checkpoint names.
#[pyfunction]
fn canonical_name(name: &str) -> String {
    naming::canonical(name).into_owned()
}

/// Parses and validates an expert config (official JSON); `origin` names it in errors.
/// Returns (experts by layer, shared_experts, non_expert_modules).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn parse_expert_config(
    text: &str,
    origin: PathBuf,
) -> PyResult<(BTreeMap<u32, Vec<u32>>, bool, bool)> {
    let c = ExpertConfig::parse(text, &origin).map_err(to_py)?;
    Ok((c.experts, c.shared_experts, c.non_expert_modules))
}

/// Serializes an expert config in the official JSON shape.
#[pyfunction]
fn dump_expert_config(
    experts: BTreeMap<u32, Vec<u32>>,
    shared_experts: bool,
    non_expert_modules: bool,
) -> String {
    ExpertConfig {
        experts,
        shared_experts,
        non_expert_modules,
    }
    .to_json()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("EsftError", py.get_type::<EsftError>())?;
    m.add("InvalidFileError", py.get_type::<InvalidFileError>())?;
    m.add("MismatchError", py.get_type::<MismatchError>())?;
    m.add_function(wrap_pyfunction!(inspect_json, m)?)?;
    m.add_function(wrap_pyfunction!(classify_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_name, m)?)?;
    m.add_function(wrap_pyfunction!(parse_expert_config, m)?)?;
    m.add_function(wrap_pyfunction!(dump_expert_config, m)?)?;
    Ok(())
}
