//! Frees removed backends once nothing uses them: the registry's garbage
//! collector. The agent runs it, not `weir run`: the L4 path has no process
//! of its own, and `weir run`'s connection counts live in the registry
//! (`weir_l7_conns`), where the collect reads them in the same lock. Without
//! an agent, removed backends stay `removed` until a `weir backend` command
//! collects them (every applied change does, in its lock).

use crate::registry::{Registry, RegistryError};

/// One collector; it remembers whether the last round failed, so a failing
/// spell is logged once (and once when it ends), not every second.
#[derive(Debug, Default)]
pub struct Collector {
    failing: bool,
}

impl Collector {
    /// One round: frees what can be freed, and logs the backends freed. An
    /// error is logged here already (once per failing spell); the caller
    /// counts it.
    pub fn round(&mut self, registry: &mut Registry) -> Result<(), RegistryError> {
        match registry.collect("weir agent") {
            Ok(outcome) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!(
                        event = "collect_recovered",
                        "freeing removed backends works again"
                    );
                }
                for line in outcome.diff.iter().filter(|_| outcome.applied) {
                    tracing::info!(event = "collected", "{line}");
                }
                Ok(())
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(
                        event = "collect_failed",
                        "freeing removed backends failed; they stay `removed` until it works \
                         (counted in weir_agent_collect_errors_total): {e}"
                    );
                }
                Err(e)
            }
        }
    }
}
