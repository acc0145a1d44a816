//! Registry: which plugin, with which limits, runs each job type.
//!
//! Loaded once from the configuration's `[job_types]`; a component shared by several job
//! types is compiled once (by content digest).

use std::collections::{BTreeMap, HashMap};

use crate::config::{Config, JobTypeConfig};
use crate::sandbox::{LoadError, Plugin, Sandbox, digest_of};

/// A job type's plugin and settings.
#[derive(Clone)]
pub struct Route {
    pub plugin: Plugin,
    pub job_type: JobTypeConfig,
}

pub struct Registry {
    routes: BTreeMap<String, Route>,
}

#[derive(Debug, thiserror::Error)]
#[error("job type {job_type}: {error}")]
pub struct RegistryError {
    pub job_type: String,
    pub error: LoadError,
}

impl Registry {
    /// Compiles every job type's plugin; any failure names the job type and the cause.
    pub fn load(sandbox: &Sandbox, config: &Config) -> Result<Self, RegistryError> {
        let mut by_digest: HashMap<String, Plugin> = HashMap::new();
        let mut routes = BTreeMap::new();
        for (name, job_type) in &config.job_types {
            let fail = |error| RegistryError {
                job_type: name.clone(),
                error,
            };
            let bytes = std::fs::read(&job_type.plugin).map_err(|error| {
                fail(LoadError::Read {
                    path: job_type.plugin.display().to_string(),
                    error,
                })
            })?;
            let digest = digest_of(&bytes);
            let plugin = match by_digest.get(&digest) {
                Some(plugin) => plugin.clone(),
                None => {
                    tracing::info!(job_type = %name, plugin = %job_type.plugin.display(), "Compiling plugin");
                    let stem = job_type
                        .plugin
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or(name);
                    let plugin = sandbox.load(stem, &bytes).map_err(fail)?;
                    by_digest.insert(digest, plugin.clone());
                    plugin
                }
            };
            tracing::info!(
                job_type = %name,
                plugin = plugin.name(),
                digest = plugin.digest(),
                memory_mib = job_type.memory_mib,
                "Plugin loaded"
            );
            routes.insert(
                name.clone(),
                Route {
                    plugin,
                    job_type: job_type.clone(),
                },
            );
        }
        Ok(Self { routes })
    }

    pub fn route(&self, job_type: &str) -> Option<&Route> {
        self.routes.get(job_type)
    }

    pub fn job_types(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}
