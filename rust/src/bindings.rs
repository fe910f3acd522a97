//! The only module that touches Python: exposes the core as `esft_rs._core`,
//! maps core errors onto the Python exception hierarchy, and releases the GIL
//! around all file and compute work.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;
use crate::expert_config::ExpertConfig;
use crate::progress::Control;
use crate::{adapter, inspect, merge, naming, split};

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
        e @ Error::Usage(_) => EsftError::new_err(e.to_string()),
        Error::Cancelled => pyo3::exceptions::PyKeyboardInterrupt::new_err("cancelled"),
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

// --- merge / split / adapters ---

/// Runs `job` on a worker thread with the GIL released; the calling thread
/// wakes every 20 ms to report progress and warnings to the callbacks and to
/// check for Ctrl-C, which cancels the job (it then removes partial outputs).
fn run_watched<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    on_warning: Option<&Bound<'_, PyAny>>,
    job: impl FnOnce(&Control) -> crate::error::Result<T> + Send,
) -> PyResult<T> {
    let ctl = Control::default();
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // Receivers are not Sync; the lock only makes `rx` shareable with `detach`.
        let rx = std::sync::Mutex::new(rx);
        let ctl = &ctl;
        let handle = s.spawn(move || {
            let r = job(ctl);
            let _ = tx.send(());
            r
        });
        loop {
            let finished = py.detach(|| {
                let waited = rx.lock().map(|r| r.recv_timeout(Duration::from_millis(20)));
                !matches!(waited, Ok(Err(RecvTimeoutError::Timeout)))
            });
            let watched = (|| -> PyResult<()> {
                for w in ctl.take_warnings() {
                    if let Some(cb) = on_warning {
                        cb.call1((w,))?;
                    }
                }
                if let Some(cb) = progress {
                    cb.call1(ctl.snapshot())?;
                }
                py.check_signals()
            })();
            if let Err(e) = watched {
                ctl.cancel();
                let _ = py.detach(|| handle.join());
                return Err(e);
            }
            if finished {
                break;
            }
        }
        match py.detach(|| handle.join()) {
            Ok(r) => r.map_err(to_py),
            Err(_) => Err(PyRuntimeError::new_err("esft-rs: worker thread panicked")),
        }
    })
}

/// Merges adapters into a base checkpoint; returns the report as JSON.
/// `progress(stage, done, total)` and `on_warning(message)` are called from
/// this thread while the work runs without the GIL.
#[pyfunction]
#[pyo3(signature = (base, adapters, out=None, on_conflict="error", force=false, dry_run=false, overwrite=false, progress=None, on_warning=None))]
#[allow(clippy::too_many_arguments)]
fn merge_json(
    py: Python<'_>,
    base: PathBuf,
    adapters: Vec<PathBuf>,
    out: Option<PathBuf>,
    on_conflict: &str,
    force: bool,
    dry_run: bool,
    overwrite: bool,
    progress: Option<Bound<'_, PyAny>>,
    on_warning: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let on_conflict = match on_conflict {
        "error" => merge::OnConflict::Error,
        "first" => merge::OnConflict::First,
        "last" => merge::OnConflict::Last,
        other => return Err(PyValueError::new_err(format!("on_conflict must be error, first or last, not {other:?}"))),
    };
    let opts = merge::MergeOptions { on_conflict, force, dry_run, overwrite };
    let report = run_watched(py, progress.as_ref(), on_warning.as_ref(), |ctl| {
        merge::merge(&base, &adapters, out.as_deref(), &opts, ctl)
    })?;
    serde_json::to_string(&report).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// Extracts expert weights of `model` into an adapter at `out` (by expert
/// config, or by difference with `base`); returns the report as JSON.
#[pyfunction]
#[pyo3(signature = (model, out, experts=None, base=None, shared_experts=false, non_expert_modules=false, dry_run=false, overwrite=false, progress=None, on_warning=None))]
#[allow(clippy::too_many_arguments)]
fn split_json(
    py: Python<'_>,
    model: PathBuf,
    out: PathBuf,
    experts: Option<PathBuf>,
    base: Option<PathBuf>,
    shared_experts: bool,
    non_expert_modules: bool,
    dry_run: bool,
    overwrite: bool,
    progress: Option<Bound<'_, PyAny>>,
    on_warning: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let opts = split::SplitOptions { experts, base, shared_experts, non_expert_modules, dry_run, overwrite };
    let report = run_watched(py, progress.as_ref(), on_warning.as_ref(), |ctl| split::split(&model, &out, &opts, ctl))?;
    serde_json::to_string(&report).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The base fingerprint of a checkpoint (see fingerprint.rs for the scheme).
#[pyfunction]
fn fingerprint(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(|| crate::fingerprint::fingerprint_path(&path, &Control::default())).map_err(to_py)
}

/// Kind, expert config, base fingerprint, metadata and tensor names of an adapter, as JSON.
#[pyfunction]
fn adapter_info_json(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    let info = py.detach(|| adapter::info(&path)).map_err(to_py)?;
    serde_json::to_string(&info).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The `__metadata__` entries of an adapter we write, in order: format, the
/// expert config (official JSON, validated), the base fingerprint, `extra` (`esft.*`).
#[pyfunction]
#[pyo3(signature = (expert_config, base_fingerprint=None, extra=Vec::new()))]
fn adapter_metadata(
    expert_config: &str,
    base_fingerprint: Option<&str>,
    extra: Vec<(String, String)>,
) -> PyResult<Vec<(String, String)>> {
    let cfg = ExpertConfig::parse(expert_config, std::path::Path::new("<expert config>")).map_err(to_py)?;
    adapter::adapter_metadata(&cfg, base_fingerprint, &extra).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Name of expert `expert`'s slice of the fused tensor `fused` (None if not fused).
#[pyfunction]
fn fused_slice_name(fused: &str, expert: u32) -> Option<String> {
    naming::fused_slice_name(fused, expert)
}

/// (fused tensor name, expert) that a slice name stands for, or None.
#[pyfunction]
fn fused_slice_parent(name: &str) -> Option<(String, u32)> {
    naming::fused_slice_parent(name)
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
    // --- merge / split / adapters ---
    let keys = [
        ("format", adapter::KEY_FORMAT),
        ("expert_config", adapter::KEY_EXPERT_CONFIG),
        ("base_fingerprint", adapter::KEY_BASE_FINGERPRINT),
        ("prefix", adapter::KEY_PREFIX),
        ("official_config", adapter::OFFICIAL_CONFIG),
    ];
    m.add("ADAPTER_KEYS", keys.into_iter().collect::<BTreeMap<_, _>>())?;
    m.add_function(wrap_pyfunction!(merge_json, m)?)?;
    m.add_function(wrap_pyfunction!(split_json, m)?)?;
    m.add_function(wrap_pyfunction!(fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_info_json, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(fused_slice_name, m)?)?;
    m.add_function(wrap_pyfunction!(fused_slice_parent, m)?)?;
    Ok(())
}
