//! The Python binding of esft-core, built by maturin into `esft_rs._core`:
//! conversions (reports as frozen classes, routing stats as numpy arrays),
//! the error mapping (`errors`), and the GIL released around all file and
//! compute work. No logic of its own.

mod errors;
mod reports;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::prelude::*;

use errors::{to_py, value_error};
use esft_core::expert_config::ExpertConfig;
use esft_core::progress::Control;
use esft_core::{adapter, inspect, lora, merge, naming, split, staging};

/// Inspects a safetensors file, checkpoint directory or adapter, from headers alone.
#[pyfunction]
#[pyo3(name = "inspect")]
fn py_inspect(py: Python<'_>, path: PathBuf) -> PyResult<reports::Inspection> {
    let report = py.detach(|| inspect::inspect(&path)).map_err(to_py)?;
    reports::Inspection::new(py, report)
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

// --- routing ---

use numpy::{Element, PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::types::PyDict;

use esft_core::routing::count::{count_any, AnyIds, AnyWeights};
use esft_core::routing::{self, RoutingStats};

/// Routing stats as a dict of numpy arrays and scalars (`esft_rs.routing.stats` wraps it).
fn stats_to_dict(py: Python<'_>, s: RoutingStats) -> PyResult<Bound<'_, PyDict>> {
    let (l, e) = (s.layers.len(), s.num_experts);
    let d = PyDict::new(py);
    d.set_item("layers", s.layers)?;
    d.set_item("top_k", s.top_k)?;
    d.set_item("num_samples", s.num_samples)?;
    d.set_item("counts", PyArray1::from_vec(py, s.counts).reshape([l, e])?)?;
    d.set_item("gate_sum", PyArray1::from_vec(py, s.gate_sum).reshape([l, e])?)?;
    d.set_item("tokens", PyArray1::from_vec(py, s.tokens))?;
    d.set_item("sample_token_sum", PyArray1::from_vec(py, s.sample_token_sum).reshape([l, e])?)?;
    d.set_item("sample_gate_sum", PyArray1::from_vec(py, s.sample_gate_sum).reshape([l, e])?)?;
    d.set_item("metadata", s.metadata.into_iter().collect::<BTreeMap<_, _>>())?;
    Ok(d)
}

fn dict_array<'py, T: Element + Copy>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<(Vec<T>, Vec<usize>)> {
    let item = d
        .get_item(key)?
        .ok_or_else(|| value_error(d.py(), format!("routing stats lack {key:?}")))?;
    let arr: PyReadonlyArrayDyn<'py, T> = item.extract()?;
    Ok((arr.as_array().iter().copied().collect(), arr.shape().to_vec()))
}

fn dict_item<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<T> {
    d.get_item(key)?
        .ok_or_else(|| value_error(d.py(), format!("routing stats lack {key:?}")))?
        .extract()
        .map_err(Into::into)
}

fn stats_from_dict(d: &Bound<'_, PyDict>) -> PyResult<RoutingStats> {
    let (counts, shape) = dict_array::<i64>(d, "counts")?;
    Ok(RoutingStats {
        layers: dict_item(d, "layers")?,
        num_experts: shape.get(1).copied().unwrap_or(0),
        top_k: dict_item(d, "top_k")?,
        num_samples: dict_item(d, "num_samples")?,
        counts,
        gate_sum: dict_array(d, "gate_sum")?.0,
        tokens: dict_array(d, "tokens")?.0,
        sample_token_sum: dict_array(d, "sample_token_sum")?.0,
        sample_gate_sum: dict_array(d, "sample_gate_sum")?.0,
        metadata: dict_item::<BTreeMap<String, String>>(d, "metadata")?.into_iter().collect(),
    })
}

struct CountArgs {
    num_experts: Option<usize>,
    lengths: Option<Vec<u64>>,
    layers: Option<Vec<u32>>,
}

fn not_contiguous(py: Python<'_>, what: &str) -> PyErr {
    value_error(py, format!("{what} must be C-contiguous"))
}

/// Counts `ids` with `weights` of whichever float dtype they hold, GIL released.
fn count_weighted(
    py: Python<'_>,
    ids: AnyIds<'_>,
    shape: &[usize],
    weights: Option<&Bound<'_, PyAny>>,
    args: CountArgs,
) -> PyResult<RoutingStats> {
    let run = |weights: Option<AnyWeights<'_>>| {
        py.detach(|| count_any(ids, weights, shape, args.num_experts, args.lengths.as_deref(), args.layers))
            .map_err(to_py)
    };
    let Some(w) = weights else {
        return run(None);
    };
    macro_rules! try_weights {
        ($($t:ty => $v:ident),*) => {$(
            if let Ok(w) = w.extract::<PyReadonlyArrayDyn<'_, $t>>() {
                if w.shape() != shape {
                    return Err(value_error(py, format!(
                        "weights have shape {:?} but expert ids have shape {shape:?}",
                        w.shape()
                    )));
                }
                return run(Some(AnyWeights::$v(w.as_slice().map_err(|_| not_contiguous(py, "weights"))?)));
            }
        )*};
    }
    try_weights!(f32 => F32, f64 => F64, half::f16 => F16);
    Err(PyTypeError::new_err("weights must be a float16, float32 or float64 numpy array"))
}

/// Counts per-token routing records ([tokens, K] or [layers, tokens, K]
/// C-contiguous numpy arrays) into routing stats, zero-copy, GIL released.
#[pyfunction]
#[pyo3(signature = (ids, weights=None, num_experts=None, lengths=None, layers=None))]
fn count_routing<'py>(
    py: Python<'py>,
    ids: &Bound<'py, PyAny>,
    weights: Option<&Bound<'py, PyAny>>,
    num_experts: Option<usize>,
    lengths: Option<Vec<u64>>,
    layers: Option<Vec<u32>>,
) -> PyResult<Bound<'py, PyDict>> {
    let args = CountArgs { num_experts, lengths, layers };
    macro_rules! try_ids {
        ($($t:ty => $v:ident),*) => {$(
            if let Ok(a) = ids.extract::<PyReadonlyArrayDyn<'_, $t>>() {
                let slice = a.as_slice().map_err(|_| not_contiguous(py, "expert ids"))?;
                return stats_to_dict(py, count_weighted(py, AnyIds::$v(slice), a.shape(), weights, args)?);
            }
        )*};
    }
    try_ids!(i32 => I32, i64 => I64, i16 => I16, i8 => I8, u8 => U8, u16 => U16, u32 => U32, u64 => U64);
    Err(PyTypeError::new_err("expert ids must be a numpy array of an integer dtype"))
}

/// Reads an official ESFT routing-log folder into routing stats.
#[pyfunction]
#[pyo3(signature = (path, top_k=6, num_experts=None))]
fn read_official_logs(
    py: Python<'_>,
    path: PathBuf,
    top_k: usize,
    num_experts: Option<usize>,
) -> PyResult<Bound<'_, PyDict>> {
    let stats = py
        .detach(|| routing::official_log::read_dir(&path, top_k, num_experts))
        .map_err(to_py)?;
    stats_to_dict(py, stats)
}

/// Loads a routing-stats safetensors file.
#[pyfunction]
fn load_routing_stats(py: Python<'_>, path: PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let stats = py.detach(|| routing::stats_file::load(&path)).map_err(to_py)?;
    stats_to_dict(py, stats)
}

/// Writes routing stats (the dict `load_routing_stats` returns) atomically.
#[pyfunction]
fn save_routing_stats(py: Python<'_>, path: PathBuf, stats: &Bound<'_, PyDict>) -> PyResult<()> {
    let stats = stats_from_dict(stats)?;
    py.detach(|| routing::stats_file::save(&stats, &path)).map_err(to_py)
}

// --- merge / split / adapters ---

/// Runs `job` on a worker thread with the GIL released; the calling thread
/// wakes every 20 ms to report progress and warnings to the callbacks and to
/// check for Ctrl-C, which cancels the job (it then removes partial outputs).
fn run_watched<T: Send>(
    py: Python<'_>,
    progress: Option<&Bound<'_, PyAny>>,
    on_warning: Option<&Bound<'_, PyAny>>,
    job: impl FnOnce(&Control) -> esft_core::error::Result<T> + Send,
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

/// Merges adapters into a base checkpoint.
/// `progress(stage, done, total)` and `on_warning(message)` are called from
/// this thread while the work runs without the GIL.
#[pyfunction]
#[pyo3(name = "merge", signature = (base, adapters, out=None, on_conflict="error", force=false, dry_run=false, overwrite=false, progress=None, on_warning=None, requantize_fp8=false))]
#[allow(clippy::too_many_arguments)]
fn py_merge(
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
    requantize_fp8: bool,
) -> PyResult<reports::MergeReport> {
    let on_conflict = match on_conflict {
        "error" => merge::OnConflict::Error,
        "first" => merge::OnConflict::First,
        "last" => merge::OnConflict::Last,
        other => return Err(value_error(py, format!("on_conflict must be error, first or last, not {other:?}"))),
    };
    let opts = merge::MergeOptions { on_conflict, force, dry_run, overwrite, requantize_fp8 };
    let report = run_watched(py, progress.as_ref(), on_warning.as_ref(), |ctl| {
        merge::merge(&base, &adapters, out.as_deref(), &opts, ctl)
    })?;
    reports::MergeReport::new(py, report)
}

/// Extracts expert weights of `model` into an adapter at `out` (by expert
/// config, or by difference with `base`).
#[pyfunction]
#[pyo3(name = "split", signature = (model, out, experts=None, base=None, shared_experts=false, non_expert_modules=false, dry_run=false, overwrite=false, progress=None, on_warning=None))]
#[allow(clippy::too_many_arguments)]
fn py_split(
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
) -> PyResult<reports::SplitReport> {
    let opts = split::SplitOptions { experts, base, shared_experts, non_expert_modules, dry_run, overwrite };
    let report = run_watched(py, progress.as_ref(), on_warning.as_ref(), |ctl| split::split(&model, &out, &opts, ctl))?;
    reports::SplitReport::new(py, report)
}

// --- outputs (staging.rs): the guard and staged writes, shared with the Python writers ---

/// Refuses outputs that are, contain or lie inside an input, or collide (EsftError).
#[pyfunction]
fn check_output_paths(outputs: Vec<PathBuf>, inputs: Vec<PathBuf>) -> PyResult<()> {
    let outs: Vec<&std::path::Path> = outputs.iter().map(PathBuf::as_path).collect();
    let ins: Vec<&std::path::Path> = inputs.iter().map(PathBuf::as_path).collect();
    staging::check_paths(&outs, &ins).map_err(to_py)
}

/// Refuses an existing `target` unless `overwrite` and esft-rs could have written it.
#[pyfunction]
#[pyo3(signature = (target, overwrite, keep=Vec::new()))]
fn check_output_target(target: PathBuf, overwrite: bool, keep: Vec<String>) -> PyResult<()> {
    staging::check_target(&target, overwrite, &keep).map_err(to_py)
}

/// Refuses an existing `target` that is a directory where the output is a file, or back.
#[pyfunction]
fn check_output_kind(target: PathBuf, directory: bool) -> PyResult<()> {
    staging::check_kind(&target, directory).map_err(to_py)
}

/// A staged output: write at `path`, then `commit` (or `discard`, or let it be collected).
#[pyclass(module = "esft_rs._core")]
struct Staging {
    staged: Option<staging::Staged>,
    path: PathBuf,
}

#[pymethods]
impl Staging {
    #[new]
    #[pyo3(signature = (target, directory=false))]
    fn new(target: PathBuf, directory: bool) -> PyResult<Self> {
        let staged = staging::Staged::new(&target, directory).map_err(to_py)?;
        let path = staged.path().to_path_buf();
        Ok(Staging { staged: Some(staged), path })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    #[pyo3(signature = (overwrite, keep=Vec::new()))]
    fn commit(&mut self, py: Python<'_>, overwrite: bool, keep: Vec<String>) -> PyResult<()> {
        let staged = self
            .staged
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("already committed or discarded"))?;
        py.detach(|| staged.commit(overwrite, &keep)).map_err(to_py)
    }

    fn discard(&mut self, py: Python<'_>) {
        let staged = self.staged.take();
        py.detach(|| drop(staged));
    }
}

/// Commits several staged outputs of one command together (all, or none and the old
/// ones kept): `items` of (Staging, overwrite, keep).
#[pyfunction]
fn commit_together(py: Python<'_>, items: Vec<(Bound<'_, Staging>, bool, Vec<String>)>) -> PyResult<()> {
    let mut staged = Vec::with_capacity(items.len());
    for (s, overwrite, keep) in items {
        let one = s
            .borrow_mut()
            .staged
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("already committed or discarded"))?;
        staged.push((one, overwrite, keep));
    }
    py.detach(|| staging::commit_all(staged)).map_err(to_py)
}

/// The base fingerprint of a checkpoint (see fingerprint.rs for the scheme).
#[pyfunction]
fn fingerprint(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(|| esft_core::fingerprint::fingerprint_path(&path, &Control::default())).map_err(to_py)
}

/// Kind, expert config, base fingerprint, metadata and tensor names of an adapter.
#[pyfunction]
fn adapter_info(py: Python<'_>, path: PathBuf) -> PyResult<reports::AdapterInfo> {
    let info = py.detach(|| adapter::info(&path)).map_err(to_py)?;
    reports::AdapterInfo::new(py, info)
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
    adapter::adapter_metadata(&cfg, base_fingerprint, &extra).map_err(to_py)
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

/// MoE layer -> number of routed experts, from (tensor name, shape) pairs
/// (`naming::moe_layout`, the one place that infers it).
#[pyfunction]
fn moe_layout(tensors: Vec<(String, Vec<u64>)>) -> BTreeMap<u32, u32> {
    naming::moe_layout(tensors.iter().map(|(n, s)| (n.as_str(), s.as_slice())))
        .into_iter()
        .map(|(l, e)| (l, e.count()))
        .collect()
}

// --- checkpoint bytes: rows read by offset, files written one tensor at a time ---

use esft_core::safetensors::{self as st, Dtype};
use numpy::PyReadwriteArrayDyn;

fn dtype(py: Python<'_>, name: &str) -> PyResult<Dtype> {
    name.parse()
        .map_err(|()| value_error(py, format!("{name:?} is not a safetensors dtype")))
}

fn closed(what: &str) -> PyErr {
    PyRuntimeError::new_err(format!("{what} is closed"))
}

/// A file opened for positional reads (a checkpoint's rows, by offset), through no
/// memory map; it stays open until `close`.
#[pyclass(module = "esft_rs._core")]
struct FileReader {
    inner: Option<st::FileReader>,
}

#[pymethods]
impl FileReader {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| st::FileReader::open(&path)).map_err(to_py)?;
        Ok(FileReader { inner: Some(inner) })
    }

    /// Fills `out`, a writable C-contiguous uint8 numpy array (a torch tensor's
    /// `.view(torch.uint8).numpy()`), with the file's bytes from `offset`, with the
    /// GIL released; returns the bytes read.
    fn read_into(&self, py: Python<'_>, offset: u64, mut out: PyReadwriteArrayDyn<'_, u8>) -> PyResult<u64> {
        let reader = self.inner.as_ref().ok_or_else(|| closed("FileReader"))?;
        let buf = out
            .as_slice_mut()
            .map_err(|_| value_error(py, "the buffer to read into must be C-contiguous"))?;
        py.detach(|| reader.read_into(offset, buf)).map_err(to_py)
    }

    /// Closes the file.
    fn close(&mut self) {
        self.inner = None;
    }
}

/// A safetensors file written one tensor at a time: the header first, from every
/// tensor's (name, dtype, shape); then `write` each tensor's bytes, in any order;
/// `commit` puts the file in place once all are written (`discard`, or a collected
/// writer, leaves nothing).
#[pyclass(module = "esft_rs._core")]
struct SafetensorsWriter {
    inner: Option<st::StreamWriter>,
}

#[pymethods]
impl SafetensorsWriter {
    #[new]
    #[pyo3(signature = (target, tensors, metadata=Vec::new()))]
    fn new(
        py: Python<'_>,
        target: PathBuf,
        tensors: Vec<(String, String, Vec<u64>)>,
        metadata: Vec<(String, String)>,
    ) -> PyResult<Self> {
        let specs = tensors
            .into_iter()
            .map(|(name, d, shape)| Ok(st::TensorSpec { dtype: dtype(py, &d)?, name, shape }))
            .collect::<PyResult<Vec<_>>>()?;
        let inner = py
            .detach(|| st::StreamWriter::create(&target, &specs, &metadata))
            .map_err(to_py)?;
        Ok(SafetensorsWriter { inner: Some(inner) })
    }

    /// Writes tensor `name`'s bytes (a C-contiguous uint8 numpy array: a torch
    /// tensor's `.view(torch.uint8).numpy()`), declared with `dtype`; GIL released.
    fn write(
        &mut self,
        py: Python<'_>,
        name: &str,
        dtype_name: &str,
        data: PyReadonlyArrayDyn<'_, u8>,
    ) -> PyResult<()> {
        let d = dtype(py, dtype_name)?;
        let writer = self.inner.as_mut().ok_or_else(|| closed("SafetensorsWriter"))?;
        let bytes = data
            .as_slice()
            .map_err(|_| value_error(py, format!("{name}: the bytes must be C-contiguous")))?;
        py.detach(|| writer.write(name, d, bytes)).map_err(to_py)
    }

    /// Puts the file in place; an existing one is replaced only with `overwrite`.
    fn commit(&mut self, py: Python<'_>, overwrite: bool) -> PyResult<()> {
        let writer = self.inner.take().ok_or_else(|| closed("SafetensorsWriter"))?;
        py.detach(|| writer.finish(overwrite)).map_err(to_py)
    }

    /// Removes the unfinished file.
    fn discard(&mut self, py: Python<'_>) {
        let inner = self.inner.take();
        py.detach(|| drop(inner));
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(py_inspect, m)?)?;
    m.add_class::<reports::Inspection>()?;
    m.add_class::<reports::TensorInfo>()?;
    m.add_class::<reports::MoeInfo>()?;
    m.add_class::<reports::MoeLayer>()?;
    m.add_class::<reports::Fp8Info>()?;
    m.add_function(wrap_pyfunction!(moe_layout, m)?)?;
    m.add("MAX_EXPERTS", esft_core::routing::MAX_EXPERTS)?;
    m.add_function(wrap_pyfunction!(classify_tensor, m)?)?;
    m.add_function(wrap_pyfunction!(canonical_name, m)?)?;
    m.add_function(wrap_pyfunction!(parse_expert_config, m)?)?;
    m.add_function(wrap_pyfunction!(dump_expert_config, m)?)?;
    // --- routing ---
    m.add_function(wrap_pyfunction!(count_routing, m)?)?;
    m.add_function(wrap_pyfunction!(read_official_logs, m)?)?;
    m.add_function(wrap_pyfunction!(load_routing_stats, m)?)?;
    m.add_function(wrap_pyfunction!(save_routing_stats, m)?)?;
    // --- merge / split / adapters ---
    let keys = [
        ("format", adapter::KEY_FORMAT),
        ("expert_config", adapter::KEY_EXPERT_CONFIG),
        ("base_fingerprint", adapter::KEY_BASE_FINGERPRINT),
        ("prefix", adapter::KEY_PREFIX),
        ("official_config", adapter::OFFICIAL_CONFIG),
        ("lora", lora::KEY_LORA),
        ("peft_config", lora::PEFT_CONFIG),
        ("peft_weights", lora::PEFT_WEIGHTS),
        ("peft_prefix", lora::PEFT_PREFIX),
        ("lora_a", lora::SUFFIX_A),
        ("lora_b", lora::SUFFIX_B),
    ];
    m.add("ADAPTER_KEYS", keys.into_iter().collect::<BTreeMap<_, _>>())?;
    m.add_function(wrap_pyfunction!(py_merge, m)?)?;
    m.add_class::<reports::MergeReport>()?;
    m.add_class::<reports::Replacement>()?;
    m.add_class::<reports::AdapterSummary>()?;
    m.add_function(wrap_pyfunction!(py_split, m)?)?;
    m.add_class::<reports::SplitReport>()?;
    m.add_class::<reports::Extracted>()?;
    m.add_function(wrap_pyfunction!(fingerprint, m)?)?;
    m.add_function(wrap_pyfunction!(adapter_info, m)?)?;
    m.add_class::<reports::AdapterInfo>()?;
    m.add_function(wrap_pyfunction!(adapter_metadata, m)?)?;
    m.add_function(wrap_pyfunction!(fused_slice_name, m)?)?;
    m.add_function(wrap_pyfunction!(fused_slice_parent, m)?)?;
    m.add_function(wrap_pyfunction!(check_output_paths, m)?)?;
    m.add_function(wrap_pyfunction!(check_output_target, m)?)?;
    m.add_function(wrap_pyfunction!(check_output_kind, m)?)?;
    m.add_class::<Staging>()?;
    m.add_function(wrap_pyfunction!(commit_together, m)?)?;
    m.add("STAGING_MARK", staging::STAGING_MARK)?;
    // --- checkpoint bytes ---
    m.add_class::<FileReader>()?;
    m.add_class::<SafetensorsWriter>()?;
    m.add("DTYPE_BITS", Dtype::all().map(|(_, n, b)| (n, b)).collect::<BTreeMap<_, _>>())?;
    Ok(())
}
