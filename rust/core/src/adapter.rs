//! Adapters: the tensors that replace base tensors in a merge. Five kinds load:
//! - ours: one safetensors file whose `__metadata__` holds the expert config
//!   (`esft.expert_config`) and the base fingerprint (`esft.base_fingerprint`),
//!   plus free-form `esft.*` keys (training config, metrics) that merge ignores;
//! - ESFT-LoRA: ours, with `esft.lora` in `__metadata__` and LoRA pairs in
//!   place of the trained expert tensors (`lora`);
//! - PEFT LoRA directories: `adapter_config.json` plus `adapter_model.safetensors`
//!   (names prefixed `base_model.model.`; its `__metadata__` may carry our keys);
//! - plain: any safetensors file of tensors named as in the base;
//! - official ESFT adapter folders: `expert_cfg.json` plus safetensors, whose
//!   legacy tensor names (`layers.L...`, relative to `model.`) are mapped to
//!   checkpoint names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::expert_config::ExpertConfig;
use crate::lora::{self, LoraPair};
use crate::naming::{self, Role};
use crate::safetensors::{Checkpoint, SafetensorsFile, TensorInfo};

pub const KEY_FORMAT: &str = "format";
pub const KEY_EXPERT_CONFIG: &str = "esft.expert_config";
pub const KEY_BASE_FINGERPRINT: &str = "esft.base_fingerprint";
/// Every key we write starts with this; other tools' keys are left alone.
pub const KEY_PREFIX: &str = "esft.";
pub const OFFICIAL_CONFIG: &str = "expert_cfg.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    Esft,
    Plain,
    Official,
    Lora,
    Peft,
}

pub struct Adapter {
    pub path: PathBuf,
    pub kind: AdapterKind,
    pub ckpt: Checkpoint,
    pub expert_config: Option<ExpertConfig>,
    pub fingerprint: Option<String>,
    /// `__metadata__` of the (first) file, in file order.
    pub metadata: Vec<(String, String)>,
    /// (shard, index, checkpoint name) of the tensors that replace base tensors whole.
    plain: Vec<(usize, usize, String)>,
    /// LoRA pairs (ESFT-LoRA and PEFT adapters), all-zero pairs left out.
    pub lora: Vec<LoraPair>,
    /// Every tensor's checkpoint name (legacy names mapped, PEFT's prefix removed), in file order.
    all_names: Vec<String>,
}

/// One adapter tensor: its name in the base's naming, and where it is stored.
pub struct AdapterTensor<'a> {
    pub name: String,
    pub file: &'a SafetensorsFile,
    pub info: &'a TensorInfo,
    /// Position: shard of the adapter's checkpoint, index in its tensors.
    pub shard: usize,
    pub index: usize,
}

impl Adapter {
    pub fn open(path: &Path) -> Result<Self> {
        let is_dir = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .is_dir();
        let peft_config = path.join(lora::PEFT_CONFIG);
        let (kind, ckpt, dir_config) = if is_dir && peft_config.is_file() {
            let weights = path.join(lora::PEFT_WEIGHTS);
            (AdapterKind::Peft, Checkpoint::open(&weights)?, None)
        } else if is_dir {
            let cfg_path = path.join(OFFICIAL_CONFIG);
            if !crate::error::present(&cfg_path) {
                return Err(Error::invalid(
                    path,
                    format!(
                        "directory has neither {OFFICIAL_CONFIG} (an official ESFT adapter folder) \
                         nor {} (a PEFT adapter)",
                        lora::PEFT_CONFIG
                    ),
                ));
            }
            let cfg = ExpertConfig::load(&cfg_path)?;
            (AdapterKind::Official, Checkpoint::open(path)?, Some(cfg))
        } else {
            (AdapterKind::Plain, Checkpoint::open(path)?, None)
        };
        let metadata = ckpt
            .shards
            .first()
            .and_then(|s| s.file.header.metadata.clone())
            .unwrap_or_default();
        let get = |k: &str| {
            metadata
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let file_config = match get(KEY_EXPERT_CONFIG) {
            Some(text) => Some(ExpertConfig::parse(&text, path).map_err(|e| {
                Error::invalid(
                    path,
                    format!(
                        "{KEY_EXPERT_CONFIG} in __metadata__: {}",
                        strip_origin(&e, path)
                    ),
                )
            })?),
            None => None,
        };
        let fingerprint = get(KEY_BASE_FINGERPRINT);
        let esft_lora = get(lora::KEY_LORA);
        let kind = match kind {
            AdapterKind::Plain if esft_lora.is_some() => AdapterKind::Lora,
            AdapterKind::Plain if file_config.is_some() || fingerprint.is_some() => AdapterKind::Esft,
            k => k,
        };
        if ckpt.tensors().next().is_none() {
            return Err(Error::invalid(path, "adapter holds no tensors"));
        }
        let names = checkpoint_names(path, &ckpt, kind == AdapterKind::Official)?;
        let config = match kind {
            AdapterKind::Lora => Some(lora::PeftConfig {
                scale: lora::esft_scale(path, esft_lora.as_deref().unwrap_or_default())?,
                ..Default::default()
            }),
            AdapterKind::Peft => Some(lora::peft_config(&peft_config)?),
            _ => None,
        };
        let weights = if kind == AdapterKind::Peft {
            path.join(lora::PEFT_WEIGHTS)
        } else {
            path.to_path_buf()
        };
        let positions = ckpt.shards.iter().enumerate().flat_map(|(si, s)| {
            (0..s.file.header.tensors.len()).map(move |ti| (si, ti))
        });
        let mut entries = Vec::with_capacity(names.len());
        for ((si, ti), name) in positions.zip(names) {
            let name = match kind {
                AdapterKind::Peft => match name.strip_prefix(lora::PEFT_PREFIX) {
                    Some(n) => n.to_string(),
                    None => {
                        return Err(Error::invalid(
                            &weights,
                            format!("key {name:?} does not start with {:?}, as PEFT's keys do", lora::PEFT_PREFIX),
                        ))
                    }
                },
                _ => name,
            };
            entries.push((si, ti, name));
        }
        let all_names = entries.iter().map(|(_, _, n)| n.clone()).collect();
        let split = lora::split(&weights, &ckpt, config.as_ref(), entries)?;
        Ok(Adapter {
            path: path.to_path_buf(),
            kind,
            expert_config: dir_config.or(file_config),
            fingerprint,
            metadata,
            ckpt,
            plain: split.plain,
            lora: split.pairs,
            all_names,
        })
    }

    /// Checkpoint names of what the adapter changes: plain tensors, then LoRA modules.
    fn names(&self) -> impl Iterator<Item = &str> {
        let plain = self.plain.iter().map(|(_, _, n)| n.as_str());
        plain.chain(self.lora.iter().map(|p| p.module.as_str()))
    }

    /// The stored name of the tensor at (shard, index).
    pub fn stored_name(&self, (si, ti): (usize, usize)) -> &str {
        &self.ckpt.shards[si].file.header.tensors[ti].name
    }

    /// The first tensor that the adapter's own expert config does not select, with
    /// why: another expert, a shared expert or a non-expert tensor the config leaves
    /// frozen. `None` when every tensor fits, or when there is no config to check.
    pub fn outside_config(&self) -> Option<String> {
        let cfg = self.expert_config.as_ref()?;
        self.names().find_map(|name| {
            let why = match naming::classify(name) {
                Role::RoutedExpert { layer, expert } => {
                    let listed = cfg.experts.get(&layer).is_some_and(|ids| ids.contains(&expert));
                    (!listed).then(|| format!("expert {expert} of layer {layer} is not in its expert config"))
                }
                Role::FusedExperts { layer } => cfg
                    .experts
                    .get(&layer)
                    .is_none_or(Vec::is_empty)
                    .then(|| format!("its expert config lists no experts of layer {layer}")),
                Role::SharedExpert { .. } | Role::SharedExpertGate { .. } => (!cfg.shared_experts)
                    .then(|| "a shared expert, but its expert config has shared_experts false".to_string()),
                _ => (!cfg.non_expert_modules).then(|| {
                    "not an expert tensor, but its expert config has non_expert_modules false".to_string()
                }),
            }?;
            Some(format!("holds {name:?}: {why}"))
        })
    }

    /// Tensors that replace base tensors whole, in file order, named as in
    /// checkpoints (legacy names mapped); LoRA pairs are in `lora`.
    pub fn tensors(&self) -> impl Iterator<Item = AdapterTensor<'_>> {
        self.plain.iter().map(|&(shard, index, ref name)| {
            let file = &self.ckpt.shards[shard].file;
            AdapterTensor {
                name: name.clone(),
                file,
                info: &file.header.tensors[index],
                shard,
                index,
            }
        })
    }
}

/// Checkpoint names of an adapter's tensors. Legacy official adapters saved
/// the state dict of the model body (`model.model`): once any name starts with
/// `layers.`, every name gets the `model.` prefix (`embed_tokens.weight` too).
/// Other adapters keep their names (merge still maps a legacy `layers.L...`
/// name that the base lacks through `naming::canonical`).
fn checkpoint_names(path: &Path, ckpt: &Checkpoint, official: bool) -> Result<Vec<String>> {
    let legacy = official
        && ckpt
            .tensors()
            .any(|(_, t)| naming::canonical(&t.name) != t.name);
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut names = Vec::new();
    for (_, t) in ckpt.tensors() {
        let name = if legacy {
            naming::from_model_body(&t.name)
        } else {
            t.name.clone()
        };
        if let Some(prev) = seen.insert(name.clone(), &t.name) {
            return Err(Error::invalid(
                path,
                format!("tensors {prev:?} and {:?} both name {name:?}", t.name),
            ));
        }
        names.push(name);
    }
    Ok(names)
}

/// An error's message without the leading "path: ", for re-wrapping.
fn strip_origin(e: &Error, path: &Path) -> String {
    let s = e.to_string();
    let prefix = format!("{}: ", path.display());
    s.strip_prefix(&prefix).map(str::to_string).unwrap_or(s)
}

/// The `__metadata__` of an adapter we write: `format`, the expert config, the
/// base fingerprint when known, then `extra` (`esft.*` keys only).
pub fn adapter_metadata(
    config: &ExpertConfig,
    fingerprint: Option<&str>,
    extra: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let mut md = vec![
        (KEY_FORMAT.to_string(), "pt".to_string()),
        (KEY_EXPERT_CONFIG.to_string(), config.to_json()),
    ];
    if let Some(fp) = fingerprint {
        md.push((KEY_BASE_FINGERPRINT.to_string(), fp.to_string()));
    }
    for (k, v) in extra {
        if !k.starts_with(KEY_PREFIX) || md.iter().any(|(key, _)| key == k) {
            return Err(Error::Usage(format!(
                "adapter metadata key {k:?}: extra keys must start with {KEY_PREFIX:?} and not be \
                 {KEY_EXPERT_CONFIG:?} or {KEY_BASE_FINGERPRINT:?}"
            )));
        }
        md.push((k.clone(), v.clone()));
    }
    Ok(md)
}

/// What `esft_rs.read_adapter` shows: kind, config, fingerprint, names.
#[derive(Serialize)]
pub struct AdapterInfo {
    pub path: String,
    pub kind: AdapterKind,
    /// The expert config in the official JSON shape, when the adapter has one.
    pub expert_config: Option<String>,
    pub base_fingerprint: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// Checkpoint names (legacy names mapped, PEFT's `base_model.model.` removed), in
    /// file order; LoRA pairs as stored (`M.lora_A.weight`, `M.lora_B.weight`).
    pub tensors: Vec<String>,
    pub total_bytes: u64,
}

pub fn info(path: &Path) -> Result<AdapterInfo> {
    let a = Adapter::open(path)?;
    Ok(AdapterInfo {
        path: path.display().to_string(),
        kind: a.kind,
        expert_config: a.expert_config.as_ref().map(ExpertConfig::to_json),
        base_fingerprint: a.fingerprint.clone(),
        metadata: a.metadata.clone(),
        tensors: a.all_names.clone(),
        total_bytes: a.ckpt.total_bytes(),
    })
}
