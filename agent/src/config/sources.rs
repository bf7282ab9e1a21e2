//! Where the raw configuration comes from and how its sources merge: the main file, then the
//! drop-in fragments by name across the directories (a later directory masks a same-named
//! fragment), tables merged deeply, other values replaced.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{invalid, Config, ConfigError};

/// Default main configuration file.
pub(crate) const DEFAULT_MAIN: &str = "/etc/update-agent/config.toml";
/// Default drop-in directories, lowest precedence first.
pub(crate) const DEFAULT_DROPIN_DIRS: [&str; 3] = [
    "/usr/lib/update-agent/config.d",
    "/run/update-agent/config.d",
    "/etc/update-agent/config.d",
];

/// Where configuration comes from; injectable for tests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigSources {
    /// The main file; when set it must exist.
    pub main: Option<PathBuf>,
    /// Drop-in directories, lowest precedence first; missing directories are skipped.
    pub dropin_dirs: Vec<PathBuf>,
}

impl ConfigSources {
    /// The system locations. `main_override` (`--config`) must exist; the default main file
    /// may be absent.
    pub fn system(main_override: Option<PathBuf>) -> Self {
        let main = main_override.or_else(|| {
            let p = PathBuf::from(DEFAULT_MAIN);
            p.exists().then_some(p)
        });
        ConfigSources {
            main,
            dropin_dirs: DEFAULT_DROPIN_DIRS.iter().map(PathBuf::from).collect(),
        }
    }

    /// The files to read, in merge order (main first, then fragments by name, masked).
    pub fn files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut out = Vec::new();
        if let Some(main) = &self.main {
            out.push(main.clone());
        }
        let mut fragments: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
        for dir in &self.dropin_dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ConfigError::Io {
                        path: dir.clone(),
                        source,
                    })
                }
            };
            for entry in entries {
                let entry = entry.map_err(|source| ConfigError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let name = entry.file_name();
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "toml")
                    && !name.to_string_lossy().starts_with('.')
                    && !path.is_dir()
                {
                    // Later directories overwrite (mask) earlier same-named fragments.
                    fragments.insert(name, path);
                }
            }
        }
        out.extend(fragments.into_values());
        Ok(out)
    }
}

impl Config {
    /// Read, check and merge every source, then validate the result.
    pub fn load(sources: &ConfigSources) -> Result<Config, ConfigError> {
        let mut merged = toml::Table::new();
        for path in sources.files()? {
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                path: path.clone(),
                source,
            })?;
            let parse_err = |source| ConfigError::Parse {
                path: path.clone(),
                source,
            };
            // Checked alone first, so unknown keys and wrong types name this file.
            let table: toml::Table = toml::from_str(&text).map_err(parse_err)?;
            super::validate::check_exactly_one(&table)?;
            toml::from_str::<Config>(&text).map_err(parse_err)?;
            tracing::debug!(path = %path.display(), "configuration source merged");
            merge(&mut merged, table);
        }
        let config: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| invalid("(merged)", e.message().to_string()))?;
        config.validate()?;
        Ok(config)
    }
}

/// Merge `over` into `base`: tables recursively, everything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
