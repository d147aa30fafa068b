//! Which services a discovery source owns, recorded in the instance's
//! state directory (`sources`, one `SERVICE SOURCE` line each) so the CLI,
//! a separate process, can warn an operator who edits one by hand.
//!
//! The source wins: a hand edit of a source-owned service stands until the
//! source's next revision, which sets the service's backends again.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::registry::ServiceAddr;

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("sources")
}

/// Replaces the record with `owners` (service → source name), atomically
/// (a new file renamed over the old), so a reader sees one or the other.
pub fn record(state_dir: &Path, owners: &BTreeMap<ServiceAddr, String>) -> std::io::Result<()> {
    let path = path(state_dir);
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp)?;
    for (service, source) in owners {
        writeln!(f, "{service} {source}")?;
    }
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// The source that owns `service`, if any. An unreadable or missing
/// record owns nothing: the warning it feeds is advice, not a lock.
pub fn owner(state_dir: &Path, service: &ServiceAddr) -> Option<String> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    text.lines().find_map(|line| {
        let (s, source) = line.split_once(' ')?;
        (s.parse::<ServiceAddr>().ok()? == *service).then(|| source.to_string())
    })
}

/// The CLI's warning before it changes a source-owned service.
pub fn warning(service: &ServiceAddr, source: &str) -> String {
    format!(
        "service {service} is owned by source {source}; your change will be overwritten at its \
         next revision"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_finds_owners() {
        let root = std::env::temp_dir().join(format!("weir-ownership-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let instance = root.as_path();
        let a: ServiceAddr = "198.19.0.10:80".parse().unwrap();
        let b: ServiceAddr = "198.19.0.11:80".parse().unwrap();
        assert_eq!(owner(instance, &a), None);
        let owners = BTreeMap::from([(a, "file /etc/weir/backends.toml".to_string())]);
        record(instance, &owners).unwrap();
        assert_eq!(
            owner(instance, &a).as_deref(),
            Some("file /etc/weir/backends.toml")
        );
        assert_eq!(owner(instance, &b), None);
        record(instance, &BTreeMap::new()).unwrap();
        assert_eq!(owner(instance, &a), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
