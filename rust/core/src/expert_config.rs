//! The official ESFT expert config, the one definition of its format:
//! `{"experts": {"<layer>": [expert ids]}, "shared_experts": bool, "non_expert_modules": bool}`.
//! Expert ids keep their order (the official files list them by descending score).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{one_line, read_input_text, Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExpertConfig {
    /// Decoder-layer index -> selected routed expert ids.
    pub experts: BTreeMap<u32, Vec<u32>>,
    pub shared_experts: bool,
    pub non_expert_modules: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    experts: UniqueMap<Vec<Value>>,
    #[serde(default)]
    shared_experts: bool,
    #[serde(default)]
    non_expert_modules: bool,
}

/// A JSON object read into a map, refusing a key given twice (serde keeps the last).
pub(crate) struct UniqueMap<V>(pub BTreeMap<String, V>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = access.next_entry::<String, V>()? {
                    if out.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
                    }
                    out.insert(k, v);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

#[derive(Serialize)]
struct RawOut<'a> {
    experts: BTreeMap<String, &'a Vec<u32>>,
    shared_experts: bool,
    non_expert_modules: bool,
}

impl ExpertConfig {
    /// Parses and validates config JSON; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text)
            .map_err(|e| Error::invalid(origin, format!("not an expert config: {}", one_line(&e.to_string()))))?;
        let mut experts = BTreeMap::new();
        for (layer, ids) in raw.experts.0 {
            let l: u32 = layer.parse().map_err(|_| {
                Error::invalid(origin, format!("layer key {layer:?} is not a non-negative integer"))
            })?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let e = id.as_u64().and_then(|e| u32::try_from(e).ok()).ok_or_else(|| {
                    Error::invalid(origin, format!("layer {l}: expert id {id} is not a non-negative integer"))
                })?;
                if out.contains(&e) {
                    return Err(Error::invalid(origin, format!("layer {l}: expert {e} listed twice")));
                }
                out.push(e);
            }
            experts.insert(l, out);
        }
        Ok(ExpertConfig {
            experts,
            shared_experts: raw.shared_experts,
            non_expert_modules: raw.non_expert_modules,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = read_input_text(path)?;
        Self::parse(&text, path)
    }

    /// Official JSON shape; layer keys as strings in the official (lexicographic) order.
    pub fn to_json(&self) -> String {
        let out = RawOut {
            experts: self.experts.iter().map(|(l, ids)| (l.to_string(), ids)).collect(),
            shared_experts: self.shared_experts,
            non_expert_modules: self.non_expert_modules,
        };
        // Serializing maps of strings and integers cannot fail.
        serde_json::to_string(&out).unwrap_or_default()
    }

    pub fn num_experts(&self) -> usize {
        self.experts.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_expert_config() {
        crate::fuzzing::run("expert_config", |bytes| {
            let text = String::from_utf8_lossy(bytes);
            match ExpertConfig::parse(&text, Path::new("cfg.json")) {
                Ok(c) => assert_eq!(ExpertConfig::parse(&c.to_json(), Path::new("x")).ok(), Some(c)),
                Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
            }
        });
    }

    #[test]
    fn round_trip_and_errors() {
        let p = Path::new("cfg.json");
        let text = r#"{"experts": {"10": [3, 1], "2": [5]}, "shared_experts": false, "non_expert_modules": true}"#;
        let c = ExpertConfig::parse(text, p).unwrap();
        assert_eq!(c.experts[&10], vec![3, 1]);
        assert!(c.non_expert_modules);
        assert_eq!(ExpertConfig::parse(&c.to_json(), p).unwrap(), c);
        assert!(c.to_json().starts_with(r#"{"experts":{"10":[3,1],"2":[5]}"#));
        for bad in [
            r#"{"experts": {"x": [1]}}"#,
            r#"{"experts": {"1": [-1]}}"#,
            r#"{"experts": {"1": [1, 1]}}"#,
            r#"{"experts": {"1": [1]}, "typo": true}"#,
            r#"{"layers": {}}"#,
            r#"{"experts": {"1": [1], "1": [2]}}"#,
            r#"{"experts": {"1": [1]}, "experts": {"2": [2]}}"#,
            "[]",
        ] {
            let err = ExpertConfig::parse(bad, p).unwrap_err().to_string();
            assert!(err.starts_with("cfg.json: "), "{err}");
        }
    }
}
