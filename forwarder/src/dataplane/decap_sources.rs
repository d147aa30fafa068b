//! The decapsulator's allow list (`weir_dcap_sources`): which outer
//! source prefixes may send IPIP to which VIP. IPIP to a VIP from anyone
//! else is dropped, so a list that was never written accepts nothing.
//!
//! Every change is all or nothing: what was added is taken out again when
//! a later entry fails, and the result is read back from the kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, Map, MapData, MapError};
use weir_ebpf::abi;

use super::{DataplaneError, kernel};
use crate::instance::Instance;

/// An IPv4 prefix, `ADDR/LEN` (a bare address is `/32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl FromStr for Prefix {
    type Err = String;

    /// Strict: host bits must be clear, so `198.18.2.2/24` (one LB, or the
    /// whole subnet?) is refused rather than guessed.
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l),
            None => (s, "32"),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("source {s:?} must be ADDR or ADDR/LEN, e.g. 198.18.2.2/32"))?;
        let len: u8 = match len.parse() {
            Ok(l) if l <= 32 => l,
            _ => return Err(format!("source {s:?}: prefix length must be 0 to 32")),
        };
        let prefix = Self { addr, len };
        if prefix.network() != addr {
            return Err(format!(
                "source {s:?} has host bits set: write {}/{len}, or {addr}/32 for that one address",
                prefix.network()
            ));
        }
        Ok(prefix)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Prefix {
    fn network(&self) -> Ipv4Addr {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        };
        Ipv4Addr::from(u32::from(self.addr) & mask)
    }

    fn key(&self, vip: Ipv4Addr) -> Key<[u8; 8]> {
        let entry = abi::DecapSource::new(vip.octets(), self.addr.octets(), self.len);
        Key::new(entry.prefixlen, data(&entry))
    }
}

fn data(entry: &abi::DecapSource) -> [u8; 8] {
    let mut d = [0u8; 8];
    d[..4].copy_from_slice(&entry.vip);
    d[4..].copy_from_slice(&entry.saddr);
    d
}

type Trie<'a> = LpmTrie<&'a mut MapData, [u8; 8], u32>;

fn trie(map: &mut Map) -> Result<Trie<'_>, DataplaneError> {
    LpmTrie::try_from(map).map_err(|e| kernel(abi::maps::DECAP_SOURCES)(e.to_string()))
}

/// Every (VIP, source prefix) entry in the map.
fn entries(map: &mut Map) -> Result<BTreeSet<(Ipv4Addr, Prefix)>, DataplaneError> {
    let trie = trie(map)?;
    trie.keys()
        .map(|k| {
            let k = k.map_err(|e| kernel(abi::maps::DECAP_SOURCES)(e.to_string()))?;
            let d = k.data();
            let vip = Ipv4Addr::new(d[0], d[1], d[2], d[3]);
            let prefix = Prefix {
                addr: Ipv4Addr::new(d[4], d[5], d[6], d[7]),
                len: k.prefix_len().saturating_sub(32).min(32) as u8,
            };
            Ok((vip, prefix))
        })
        .collect()
}

/// Adds `sources` to `vip`'s allow list; returns the ones that were not
/// there yet. On any failure the ones added so far are removed again.
pub fn allow(
    map: &mut Map,
    vip: Ipv4Addr,
    sources: &[Prefix],
) -> Result<Vec<Prefix>, DataplaneError> {
    if sources.is_empty() {
        return Err(DataplaneError::Kernel {
            what: "--from".into(),
            detail: format!(
                "no source given for {vip}: name the LB addresses, e.g. --from 198.18.2.2/32"
            ),
        });
    }
    let before = entries(map)?;
    let new: Vec<Prefix> = sources
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|p| !before.contains(&(vip, *p)))
        .collect();
    write_each(map, vip, &new, Write::Allow)?;
    let after = entries(map)?;
    let missing: Vec<String> = sources
        .iter()
        .filter(|p| !after.contains(&(vip, **p)))
        .map(Prefix::to_string)
        .collect();
    if !missing.is_empty() {
        return Err(DataplaneError::Kernel {
            what: format!("reading back the allow list of {vip}"),
            detail: format!("{} missing after the write", missing.join(", ")),
        });
    }
    Ok(new)
}

/// One kind of allow-list write; its inverse undoes it.
#[derive(Clone, Copy)]
enum Write {
    Allow,
    Revoke,
}

impl Write {
    fn apply(self, trie: &mut Trie<'_>, vip: Ipv4Addr, p: Prefix) -> Result<(), MapError> {
        match self {
            Write::Allow => trie.insert(&p.key(vip), 1, 0),
            Write::Revoke => trie.remove(&p.key(vip)),
        }
    }

    fn inverse(self) -> Self {
        match self {
            Write::Allow => Write::Revoke,
            Write::Revoke => Write::Allow,
        }
    }

    fn failed(self, vip: Ipv4Addr, p: Prefix, e: MapError) -> DataplaneError {
        match self {
            Write::Allow => DataplaneError::Kernel {
                what: format!("allowing {p} to send to {vip}"),
                detail: full_hint(e),
            },
            Write::Revoke => kernel(format!("revoking {p} for {vip}"))(e.to_string()),
        }
    }

    /// The command that applies this write to `sources`.
    fn command(self, vip: Ipv4Addr, sources: &[String]) -> String {
        let verb = match self {
            Write::Allow => "allow",
            Write::Revoke => "revoke",
        };
        format!("weir decap {verb} --vip {vip} --from {}", sources.join(","))
    }
}

/// Applies `write` to each of `sources` in turn, all or nothing: on a
/// failure the ones written so far are undone, and any that cannot be are
/// named in the error with the command that puts them right.
fn write_each(
    map: &mut Map,
    vip: Ipv4Addr,
    sources: &[Prefix],
    write: Write,
) -> Result<(), DataplaneError> {
    let mut trie = trie(map)?;
    for (i, p) in sources.iter().enumerate() {
        if let Err(e) = write.apply(&mut trie, vip, *p) {
            let error = write.failed(vip, *p, e);
            let undo = write.inverse();
            let stuck: Vec<String> = sources[..i]
                .iter()
                .filter(|done| undo.apply(&mut trie, vip, **done).is_err())
                .map(Prefix::to_string)
                .collect();
            return Err(left_behind(error, &stuck, &undo.command(vip, &stuck)));
        }
    }
    Ok(())
}

/// `error`, and if undoing the steps before it failed for `stuck`, which
/// entries were left changed and the command that puts them right: a
/// half-applied change is never reported as a plain failure.
pub(super) fn left_behind(error: DataplaneError, stuck: &[String], fix: &str) -> DataplaneError {
    if stuck.is_empty() {
        return error;
    }
    DataplaneError::Kernel {
        what: error.to_string(),
        detail: format!(
            "and undoing it failed for {}, which stay changed: run `{fix}`",
            stuck.join(", ")
        ),
    }
}

fn full_hint(e: MapError) -> String {
    let text = e.to_string();
    if text.contains("No space") || text.contains("os error 7") || text.contains("os error 28") {
        format!(
            "{text}: the allow list holds {} entries at most; revoke some with `weir decap revoke`",
            abi::MAX_DECAP_SOURCES
        )
    } else {
        text
    }
}

/// Removes `sources` from `vip`'s allow list. Refused, changing nothing,
/// if one of them is not on it; on a failure half-way the removed ones are
/// put back.
pub fn revoke(
    map: &mut Map,
    vip: Ipv4Addr,
    sources: &[Prefix],
) -> Result<Vec<Prefix>, DataplaneError> {
    let before = entries(map)?;
    let unknown: Vec<String> = sources
        .iter()
        .filter(|p| !before.contains(&(vip, **p)))
        .map(Prefix::to_string)
        .collect();
    if !unknown.is_empty() {
        return Err(DataplaneError::Kernel {
            what: format!("revoking sources of {vip}"),
            detail: format!(
                "{} not on its allow list, nothing changed; see `weir decap list`",
                unknown.join(", ")
            ),
        });
    }
    let gone: Vec<Prefix> = sources
        .iter()
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    write_each(map, vip, &gone, Write::Revoke)?;
    let after = entries(map)?;
    let left: Vec<String> = gone
        .iter()
        .filter(|p| after.contains(&(vip, **p)))
        .map(Prefix::to_string)
        .collect();
    if !left.is_empty() {
        return Err(DataplaneError::Kernel {
            what: format!("reading back the allow list of {vip}"),
            detail: format!("{} still present after the removal", left.join(", ")),
        });
    }
    Ok(gone)
}

/// Sources allowed per VIP, read from the kernel.
pub fn sources_of(map: &mut Map) -> Result<BTreeMap<Ipv4Addr, Vec<Prefix>>, DataplaneError> {
    let mut out: BTreeMap<Ipv4Addr, Vec<Prefix>> = BTreeMap::new();
    for (vip, p) in entries(map)? {
        out.entry(vip).or_default().push(p);
    }
    Ok(out)
}

/// Opens one of the decapsulator's pinned maps; a clear error if this
/// instance never attached one.
fn open_pinned(instance: &Instance, name: &str) -> Result<Map, DataplaneError> {
    let path = instance.pin_dir().join(name);
    if !path.exists() {
        return Err(DataplaneError::Kernel {
            what: format!("instance {:?}", instance.name()),
            detail: format!(
                "has no decapsulator ({} missing); run `weir decap attach --dev IFACE --vip VIP \
                 --from CIDR` first",
                path.display()
            ),
        });
    }
    let data =
        MapData::from_pin(&path).map_err(|e| kernel(path.display().to_string())(e.to_string()))?;
    Map::from_map_data(data).map_err(|e| kernel(path.display().to_string())(e.to_string()))
}

/// The VIPs the decapsulator serves, each with its allowed sources (empty:
/// IPIP to it is dropped from everyone).
pub fn list(instance: &Instance) -> Result<BTreeMap<Ipv4Addr, Vec<Prefix>>, DataplaneError> {
    let vips_map = open_pinned(instance, abi::maps::DECAP_VIPS)?;
    let mut sources = open_pinned(instance, abi::maps::DECAP_SOURCES)?;
    let mut out = sources_of(&mut sources)?;
    let vips: HashMap<&MapData, abi::DecapKey, u32> =
        HashMap::try_from(&vips_map).map_err(|e| kernel(abi::maps::DECAP_VIPS)(e.to_string()))?;
    for key in vips.keys() {
        let key = key.map_err(|e| kernel(abi::maps::DECAP_VIPS)(e.to_string()))?;
        out.entry(Ipv4Addr::from(key.vip)).or_default();
    }
    Ok(out)
}

/// Whether `vip` is one the decapsulator serves.
fn is_decap_vip(instance: &Instance, vip: Ipv4Addr) -> Result<bool, DataplaneError> {
    Ok(list(instance)?.contains_key(&vip))
}

/// `weir decap allow`: adds sources for a VIP already decapsulated.
pub fn allow_pinned(
    instance: &Instance,
    vip: Ipv4Addr,
    sources: &[Prefix],
) -> Result<Vec<Prefix>, DataplaneError> {
    crate::instance::require_root()?;
    let _lock = instance.lock()?;
    if !is_decap_vip(instance, vip)? {
        return Err(DataplaneError::Kernel {
            what: format!("{vip}"),
            detail: "is not a decapsulated VIP here; add it with `weir decap attach --dev IFACE \
                     --vip VIP --from CIDR`"
                .into(),
        });
    }
    let mut map = open_pinned(instance, abi::maps::DECAP_SOURCES)?;
    allow(&mut map, vip, sources)
}

/// `weir decap revoke`: removes sources of a VIP.
pub fn revoke_pinned(
    instance: &Instance,
    vip: Ipv4Addr,
    sources: &[Prefix],
) -> Result<Vec<Prefix>, DataplaneError> {
    crate::instance::require_root()?;
    let _lock = instance.lock()?;
    let mut map = open_pinned(instance, abi::maps::DECAP_SOURCES)?;
    revoke(&mut map, vip, sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_strictly() {
        let p: Prefix = "198.18.2.2".parse().unwrap();
        assert_eq!(p.to_string(), "198.18.2.2/32");
        assert_eq!(
            "198.18.2.0/24".parse::<Prefix>().unwrap().to_string(),
            "198.18.2.0/24"
        );
        assert_eq!("0.0.0.0/0".parse::<Prefix>().unwrap().len, 0);
        let e = "198.18.2.2/24".parse::<Prefix>().unwrap_err();
        assert!(e.contains("198.18.2.0/24"), "{e}");
        assert!("198.18.2.0/33".parse::<Prefix>().is_err());
        assert!("lb1".parse::<Prefix>().is_err());
    }

    #[test]
    fn keys_put_the_vip_first() {
        let k = "198.18.2.0/24"
            .parse::<Prefix>()
            .unwrap()
            .key(Ipv4Addr::new(198, 19, 0, 10));
        assert_eq!(k.prefix_len(), 56);
        assert_eq!(k.data(), [198, 19, 0, 10, 198, 18, 2, 0]);
    }
}
