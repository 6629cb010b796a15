//! `--key value` argument parsing; hand-written to keep the harness free of a CLI framework.

use std::collections::HashMap;
use std::str::FromStr;

pub struct Args(HashMap<String, String>);

impl Args {
    pub fn parse(argv: impl Iterator<Item = String>) -> Result<Self, String> {
        let mut map = HashMap::new();
        let mut argv = argv;
        while let Some(flag) = argv.next() {
            let key = flag
                .strip_prefix("--")
                .ok_or_else(|| format!("unexpected argument {flag:?}"))?;
            let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
            if map.insert(key.to_string(), value).is_some() {
                return Err(format!("{flag} given twice"));
            }
        }
        Ok(Self(map))
    }

    pub fn required<T: FromStr>(&self, key: &str) -> Result<T, String> {
        self.optional(key)?
            .ok_or_else(|| format!("--{key} is required"))
    }

    pub fn optional<T: FromStr>(&self, key: &str) -> Result<Option<T>, String> {
        self.0
            .get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("--{key}: cannot parse {v:?}"))
            })
            .transpose()
    }

    /// Fails on flags the subcommand does not know, so a typo is not silently ignored.
    pub fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!("unknown option --{k}")),
            None => Ok(()),
        }
    }
}
