//! The core's reports as frozen Python classes: `esft_rs.inspect`, `merge`,
//! `split` and `read_adapter` return these directly (no JSON in between).
//! Sequences are tuples and maps are dicts, as in the dataclasses they replace;
//! an expert config is an `esft_rs.ExpertConfig`. `to_dict()` gives the JSON
//! shape `--json` prints (the core's serde form).

use std::path::Path;

use esft_core::adapter::{self, AdapterKind};
use esft_core::expert_config::ExpertConfig;
use esft_core::{inspect, merge, split};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::errors::to_py;

fn tuple<'py, T: IntoPyObject<'py>>(
    py: Python<'py>,
    items: impl IntoIterator<Item = T, IntoIter: ExactSizeIterator>,
) -> PyResult<Py<PyTuple>> {
    Ok(PyTuple::new(py, items)?.unbind())
}

/// A serde value as plain Python objects (dicts, lists, numbers, strings).
fn plain<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| crate::errors::value_error(py, e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// The official expert config JSON as an `esft_rs.files.expert_config.ExpertConfig`.
fn expert_config(py: Python<'_>, json: &str, origin: &Path) -> PyResult<Py<PyAny>> {
    let c = ExpertConfig::parse(json, origin).map_err(to_py)?;
    let class = py.import("esft_rs.files.expert_config")?.getattr("ExpertConfig")?;
    Ok(class.call1((c.experts, c.shared_experts, c.non_expert_modules))?.unbind())
}

fn kind(k: AdapterKind) -> &'static str {
    match k {
        AdapterKind::Esft => "esft",
        AdapterKind::Plain => "plain",
        AdapterKind::Official => "official",
        AdapterKind::Lora => "lora",
        AdapterKind::Peft => "peft",
    }
}

// --- inspect ---

/// One tensor of a checkpoint, from its header.
#[pyclass(frozen, get_all, module = "esft_rs._core")]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Py<PyTuple>,
    pub bytes: u64,
    /// The shard (file name) that holds it.
    pub file: String,
    /// Absolute offset of its first byte in that file.
    pub offset: u64,
}

/// One MoE layer: its routed experts, shared experts and router.
#[pyclass(frozen, get_all, name = "MoELayer", module = "esft_rs._core")]
pub struct MoeLayer {
    pub experts: Py<PyTuple>,
    pub shared_experts: bool,
    pub router: bool,
    /// per-expert | fused | mixed | none
    pub layout: String,
    pub expert_bytes: u64,
}

/// The MoE structure a checkpoint's names show.
#[pyclass(frozen, get_all, name = "MoEInfo", module = "esft_rs._core")]
pub struct MoeInfo {
    pub num_layers: u32,
    pub moe_layers: Py<PyTuple>,
    pub dense_layers: Py<PyTuple>,
    pub experts_per_layer: Option<usize>,
    pub layers: Py<PyDict>,
    pub router_tensors: usize,
    pub shared_expert_tensors: usize,
    pub routed_expert_tensors: usize,
    pub routed_expert_bytes: u64,
    /// One routed expert, scale tensors included, when all are alike.
    pub bytes_per_expert: Option<u64>,
}

/// Block-FP8 weights (DeepSeek-V3): F8_E4M3 tensors with `weight_scale_inv` companions.
#[pyclass(frozen, get_all, name = "FP8Info", module = "esft_rs._core")]
pub struct Fp8Info {
    pub block_size: (u64, u64),
    /// config.json | default (128x128)
    pub block_size_from: String,
    pub scaled_weights: usize,
    pub scale_bytes: u64,
    /// F8_E4M3 tensors without a scale tensor.
    pub unscaled: Py<PyTuple>,
}

/// What a checkpoint or adapter holds, from its headers.
#[pyclass(frozen, module = "esft_rs._core")]
pub struct Inspection {
    #[pyo3(get)]
    pub path: String,
    #[pyo3(get)]
    pub files: Py<PyTuple>,
    #[pyo3(get)]
    pub tensors: Py<PyDict>,
    #[pyo3(get)]
    pub metadata: Py<PyDict>,
    #[pyo3(get)]
    pub file_metadata: Py<PyDict>,
    #[pyo3(get)]
    pub total_tensors: usize,
    #[pyo3(get)]
    pub total_bytes: u64,
    #[pyo3(get)]
    pub moe: Py<MoeInfo>,
    /// Present when the checkpoint holds F8_E4M3 tensors.
    #[pyo3(get)]
    pub fp8: Option<Py<Fp8Info>>,
    core: inspect::Inspection,
}

#[pymethods]
impl Inspection {
    /// The JSON shape printed by `esft-rs inspect --json`.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        plain(py, &self.core)
    }
}

impl Inspection {
    pub fn new(py: Python<'_>, r: inspect::Inspection) -> PyResult<Self> {
        let tensors = PyDict::new(py);
        for (name, t) in &r.tensors.0 {
            let info = TensorInfo {
                name: name.clone(),
                dtype: t.dtype.clone(),
                shape: tuple(py, &t.shape)?,
                bytes: t.bytes,
                file: t.file.clone(),
                offset: t.offset,
            };
            tensors.set_item(name, Py::new(py, info)?)?;
        }
        let m = &r.moe;
        let layers = PyDict::new(py);
        for (l, layer) in &m.layers {
            let layer = MoeLayer {
                experts: tuple(py, &layer.experts)?,
                shared_experts: layer.shared_experts,
                router: layer.router,
                layout: layer.layout.clone(),
                expert_bytes: layer.expert_bytes,
            };
            layers.set_item(l, Py::new(py, layer)?)?;
        }
        let moe = MoeInfo {
            num_layers: m.num_layers,
            moe_layers: tuple(py, &m.moe_layers)?,
            dense_layers: tuple(py, &m.dense_layers)?,
            experts_per_layer: m.experts_per_layer,
            layers: layers.unbind(),
            router_tensors: m.router_tensors,
            shared_expert_tensors: m.shared_expert_tensors,
            routed_expert_tensors: m.routed_expert_tensors,
            routed_expert_bytes: m.routed_expert_bytes,
            bytes_per_expert: m.bytes_per_expert,
        };
        let fp8 = match &r.fp8 {
            Some(f) => Some(Py::new(
                py,
                Fp8Info {
                    block_size: (f.block_size[0], f.block_size[1]),
                    block_size_from: f.block_size_from.to_string(),
                    scaled_weights: f.scaled_weights,
                    scale_bytes: f.scale_bytes,
                    unscaled: tuple(py, &f.unscaled)?,
                },
            )?),
            None => None,
        };
        Ok(Inspection {
            path: r.path.clone(),
            files: tuple(py, &r.files)?,
            tensors: tensors.unbind(),
            metadata: r.metadata.clone().into_pyobject(py)?.unbind(),
            file_metadata: r.file_metadata.clone().into_pyobject(py)?.unbind(),
            total_tensors: r.total_tensors,
            total_bytes: r.total_bytes,
            moe: Py::new(py, moe)?,
            fp8,
            core: r,
        })
    }
}

// --- merge ---

/// One base tensor (whole, or one expert's slice) a merge replaced.
#[pyclass(frozen, get_all, module = "esft_rs._core")]
pub struct Replacement {
    pub tensor: String,
    /// The base shard.
    pub file: String,
    pub adapter: String,
    /// The adapter tensor's name as stored.
    pub source: String,
    /// Naming role of the base tensor (routed_expert, fused_experts, ...).
    pub kind: String,
    pub layer: Option<u32>,
    pub expert: Option<u32>,
    pub bytes: u64,
    /// Quantised to block FP8 (an F8_E4M3 weight or its scale), not copied.
    pub requantized: bool,
}

/// One adapter of a merge.
#[pyclass(frozen, get_all, module = "esft_rs._core")]
pub struct AdapterSummary {
    pub path: String,
    /// esft | plain | official
    pub kind: String,
    pub base_fingerprint: Option<String>,
    pub tensors: usize,
    pub bytes: u64,
}

/// What `esft_rs.merge` did (or, with `dry_run`, would do).
#[pyclass(frozen, module = "esft_rs._core")]
pub struct MergeReport {
    #[pyo3(get)]
    pub base: String,
    #[pyo3(get)]
    pub out: String,
    #[pyo3(get)]
    pub dry_run: bool,
    #[pyo3(get)]
    pub base_fingerprint: Option<String>,
    #[pyo3(get)]
    pub adapters: Py<PyTuple>,
    #[pyo3(get)]
    pub replaced: Py<PyTuple>,
    #[pyo3(get)]
    pub replaced_bytes: u64,
    /// Base F8_E4M3 weights written by quantising.
    #[pyo3(get)]
    pub requantized: Py<PyTuple>,
    #[pyo3(get)]
    pub total_bytes: u64,
    #[pyo3(get)]
    pub files: Py<PyTuple>,
    #[pyo3(get)]
    pub copied_files: Py<PyTuple>,
    #[pyo3(get)]
    pub warnings: Py<PyTuple>,
    core: merge::MergeReport,
}

#[pymethods]
impl MergeReport {
    /// The JSON shape printed by `esft-rs merge --json`.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        plain(py, &self.core)
    }
}

impl MergeReport {
    pub fn new(py: Python<'_>, r: merge::MergeReport) -> PyResult<Self> {
        let adapters = r.adapters.iter().map(|a| {
            Py::new(
                py,
                AdapterSummary {
                    path: a.path.clone(),
                    kind: kind(a.kind).to_string(),
                    base_fingerprint: a.base_fingerprint.clone(),
                    tensors: a.tensors,
                    bytes: a.bytes,
                },
            )
        });
        let replaced = r.replaced.iter().map(|x| {
            Py::new(
                py,
                Replacement {
                    tensor: x.tensor.clone(),
                    file: x.file.clone(),
                    adapter: x.adapter.clone(),
                    source: x.source.clone(),
                    kind: x.kind.to_string(),
                    layer: x.layer,
                    expert: x.expert,
                    bytes: x.bytes,
                    requantized: x.requantized,
                },
            )
        });
        Ok(MergeReport {
            base: r.base.clone(),
            out: r.out.clone(),
            dry_run: r.dry_run,
            base_fingerprint: r.base_fingerprint.clone(),
            adapters: tuple(py, adapters.collect::<PyResult<Vec<_>>>()?)?,
            replaced: tuple(py, replaced.collect::<PyResult<Vec<_>>>()?)?,
            replaced_bytes: r.replaced_bytes,
            requantized: tuple(py, &r.requantized)?,
            total_bytes: r.total_bytes,
            files: tuple(py, &r.files)?,
            copied_files: tuple(py, &r.copied_files)?,
            warnings: tuple(py, &r.warnings)?,
            core: r,
        })
    }
}

// --- split ---

/// One tensor (or expert slice) a split extracted.
#[pyclass(frozen, get_all, module = "esft_rs._core")]
pub struct Extracted {
    /// Name in the adapter.
    pub tensor: String,
    /// The model tensor it comes from.
    pub source: String,
    pub file: String,
    pub kind: String,
    pub layer: Option<u32>,
    pub expert: Option<u32>,
    pub bytes: u64,
}

/// What `esft_rs.split` extracted (or, with `dry_run`, would extract).
#[pyclass(frozen, module = "esft_rs._core")]
pub struct SplitReport {
    #[pyo3(get)]
    pub model: String,
    #[pyo3(get)]
    pub out: String,
    #[pyo3(get)]
    pub dry_run: bool,
    /// experts | diff
    #[pyo3(get)]
    pub mode: String,
    #[pyo3(get)]
    pub expert_config: Py<PyAny>,
    #[pyo3(get)]
    pub base_fingerprint: Option<String>,
    #[pyo3(get)]
    pub tensors: Py<PyTuple>,
    #[pyo3(get)]
    pub bytes: u64,
    #[pyo3(get)]
    pub differing_excluded: Py<PyTuple>,
    #[pyo3(get)]
    pub compared_bytes: u64,
    #[pyo3(get)]
    pub warnings: Py<PyTuple>,
    core: split::SplitReport,
}

#[pymethods]
impl SplitReport {
    /// The JSON shape printed by `esft-rs split --json` (the expert config as an object).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let d = plain(py, &self.core)?;
        d.set_item("expert_config", py.import("json")?.call_method1("loads", (&self.core.expert_config,))?)?;
        Ok(d)
    }
}

impl SplitReport {
    pub fn new(py: Python<'_>, r: split::SplitReport) -> PyResult<Self> {
        let tensors = r.tensors.iter().map(|t| {
            Py::new(
                py,
                Extracted {
                    tensor: t.tensor.clone(),
                    source: t.source.clone(),
                    file: t.file.clone(),
                    kind: t.kind.to_string(),
                    layer: t.layer,
                    expert: t.expert,
                    bytes: t.bytes,
                },
            )
        });
        Ok(SplitReport {
            model: r.model.clone(),
            out: r.out.clone(),
            dry_run: r.dry_run,
            mode: r.mode.to_string(),
            expert_config: expert_config(py, &r.expert_config, Path::new(&r.out))?,
            base_fingerprint: r.base_fingerprint.clone(),
            tensors: tuple(py, tensors.collect::<PyResult<Vec<_>>>()?)?,
            bytes: r.bytes,
            differing_excluded: tuple(py, &r.differing_excluded)?,
            compared_bytes: r.compared_bytes,
            warnings: tuple(py, &r.warnings)?,
            core: r,
        })
    }
}

// --- adapters ---

/// An adapter: ours, a plain safetensors file, or an official folder.
#[pyclass(frozen, get_all, module = "esft_rs._core")]
pub struct AdapterInfo {
    pub path: String,
    /// esft | plain | official
    pub kind: String,
    pub expert_config: Option<Py<PyAny>>,
    pub base_fingerprint: Option<String>,
    pub metadata: Py<PyDict>,
    /// Checkpoint names (legacy official names mapped).
    pub tensors: Py<PyTuple>,
    pub total_bytes: u64,
}

impl AdapterInfo {
    pub fn new(py: Python<'_>, a: adapter::AdapterInfo) -> PyResult<Self> {
        let origin = Path::new(&a.path);
        Ok(AdapterInfo {
            expert_config: a.expert_config.as_deref().map(|c| expert_config(py, c, origin)).transpose()?,
            kind: kind(a.kind).to_string(),
            base_fingerprint: a.base_fingerprint,
            metadata: {
                let d = PyDict::new(py);
                for (k, v) in a.metadata {
                    d.set_item(k, v)?;
                }
                d.unbind()
            },
            tensors: tuple(py, a.tensors)?,
            total_bytes: a.total_bytes,
            path: a.path,
        })
    }
}
