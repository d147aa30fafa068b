//! What the agent's discovery sources last did, recorded in the instance's
//! state directory (`sources.json`) for the CLI, a separate process:
//! `weir stats` shows each source's freshness (stale: its last report was
//! not applied, the registry keeps an older revision), and the backend
//! commands warn an operator who edits a service a source owns.
//!
//! The source wins: a hand edit of a source-owned service stands until the
//! source's next revision, which sets the service's backends again.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::registry::ServiceAddr;

/// The whole record, as the agent last wrote it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The agent that wrote it: the record is only current while it runs.
    pub agent_pid: u32,
    pub written_ms: u64,
    pub sources: Vec<SourceStatus>,
}

/// One source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// As configured: `etcd http://10.0.0.5:2379 /weir/edge-1/`.
    pub source: String,
    /// What became of its last report: applied, empty, refused, guard,
    /// error (the agent's `weir_agent_source_reports_total` outcomes).
    pub last: String,
    /// The last report was not applied: the registry keeps what was
    /// applied from it before (fail static).
    pub stale: bool,
    pub stale_since_ms: Option<u64>,
    /// Why the last report was not applied.
    pub reason: Option<String>,
    /// The revision the registry holds from it, and when it was applied.
    pub applied_revision: Option<String>,
    pub applied_at_ms: Option<u64>,
    /// The services it named at that revision: it owns them.
    pub services: Vec<String>,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("sources.json")
}

/// Replaces the record, atomically (a new file renamed over the old), so
/// a reader sees one or the other.
pub fn write(state_dir: &Path, record: &Record) -> std::io::Result<()> {
    let path = path(state_dir);
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(record)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// The record, if an agent with sources ever wrote one.
pub fn read(state_dir: &Path) -> std::io::Result<Option<Record>> {
    match std::fs::read(path(state_dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} does not parse: {e}", path(state_dir).display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The source that owns `service`, if any. An unreadable or missing
/// record owns nothing: the warning it feeds is advice, not a lock.
pub fn owner(state_dir: &Path, service: &ServiceAddr) -> Option<String> {
    let record = read(state_dir).ok()??;
    let name = service.to_string();
    record
        .sources
        .into_iter()
        .find(|s| s.services.contains(&name))
        .map(|s| s.source)
}

/// The CLI's warning before it changes a source-owned service.
pub fn warning(service: &ServiceAddr, source: &str) -> String {
    format!(
        "service {service} is owned by source {source}; your change will be overwritten at its \
         next revision"
    )
}

/// Whether the agent that wrote the record still runs: a live process of
/// that pid whose command line is a `weir agent`.
pub fn agent_running(record: &Record) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", record.agent_pid)) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    args.next().is_some_and(|bin| bin.ends_with(b"weir")) && args.any(|a| a == b"agent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sources_and_finds_owners() {
        let root = std::env::temp_dir().join(format!("weir-sources-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let dir = root.as_path();
        let a: ServiceAddr = "198.19.0.10:80".parse().unwrap();
        let b: ServiceAddr = "198.19.0.11:80".parse().unwrap();
        assert_eq!(read(dir).unwrap(), None);
        assert_eq!(owner(dir, &a), None);
        let record = Record {
            agent_pid: std::process::id(),
            written_ms: 1,
            sources: vec![SourceStatus {
                source: "file /etc/weir/backends.toml".into(),
                last: "refused".into(),
                stale: true,
                stale_since_ms: Some(5),
                reason: Some("line 3: expected `=`".into()),
                applied_revision: Some("7".into()),
                applied_at_ms: Some(4),
                services: vec![a.to_string()],
            }],
        };
        write(dir, &record).unwrap();
        assert_eq!(read(dir).unwrap().as_ref(), Some(&record));
        assert_eq!(
            owner(dir, &a).as_deref(),
            Some("file /etc/weir/backends.toml")
        );
        assert_eq!(owner(dir, &b), None);
        // The test binary is no `weir agent`.
        assert!(!agent_running(&record));
        std::fs::write(dir.join("sources.json"), b"{\"agent_pid\":").unwrap();
        assert!(read(dir).is_err());
        assert_eq!(owner(dir, &a), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
