//! The running configuration as the long-lived parts of the daemon see it
//! (admin API, alert monitor): swapped in place by a reload.

use std::sync::{Arc, RwLock};

use super::Config;

/// A configuration a reload replaces while its readers keep running.
/// Readers take the [`current`](SharedConfig::current) one for as long as
/// they need it (one request, one look), so a reload never changes it under
/// them half-way.
#[derive(Debug, Clone)]
pub struct SharedConfig(Arc<RwLock<Arc<Config>>>);

impl SharedConfig {
    /// A handle on `config`.
    pub fn new(config: Arc<Config>) -> Self {
        SharedConfig(Arc::new(RwLock::new(config)))
    }

    /// The configuration in force now.
    pub fn current(&self) -> Arc<Config> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `config` in force for every holder of this handle.
    pub fn replace(&self, config: Arc<Config>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }
}

impl From<Arc<Config>> for SharedConfig {
    fn from(config: Arc<Config>) -> Self {
        SharedConfig::new(config)
    }
}

impl From<Config> for SharedConfig {
    fn from(config: Config) -> Self {
        SharedConfig::new(Arc::new(config))
    }
}
