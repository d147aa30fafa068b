//! A ring's digest over slot → backend address: what several weir hosts
//! fed the same backend set compare to know they send every flow to the
//! same backend. Backend ids are host-local (they depend on the order
//! backends arrived in), so the digest reads addresses, never ids.

use std::collections::BTreeMap;
use std::fmt::Write;

use sha1::{Digest, Sha1};
use weir_ebpf::abi::NO_BACKEND;

use super::model::BackendEntry;

/// Bumped if what is hashed ever changes, so that hosts of different
/// versions never appear to agree.
const DOMAIN: &[u8] = b"weir ring digest v1";

/// SHA-1, in hex, of the ring size and, slot by slot, the backend's IPv4
/// address and port (6 bytes, network order), or six 0xff bytes for a
/// slot with no backend (or an id `backends` does not know).
pub fn ring_digest(ring: &[u32], backends: &BTreeMap<u32, BackendEntry>) -> String {
    let mut sha = Sha1::new();
    sha.update(DOMAIN);
    sha.update((ring.len() as u32).to_be_bytes());
    for id in ring {
        let slot = match backends.get(id).filter(|_| *id != NO_BACKEND) {
            Some(b) => {
                let mut bytes = [0u8; 6];
                bytes[..4].copy_from_slice(&b.addr.addr.octets());
                bytes[4..].copy_from_slice(&b.addr.port.to_be_bytes());
                bytes
            }
            None => [0xff; 6],
        };
        sha.update(slot);
    }
    sha.finalize().iter().fold(String::new(), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::registry::model::BackendAddr;

    fn entry(last: u8, port: u16) -> BackendEntry {
        BackendEntry::new(
            0,
            BackendAddr {
                addr: Ipv4Addr::new(198, 18, 0, last),
                port,
            },
            1,
        )
    }

    #[test]
    fn ids_do_not_matter_addresses_do() {
        let a = BTreeMap::from([(0, entry(1, 80)), (1, entry(2, 80))]);
        let b = BTreeMap::from([(7, entry(1, 80)), (3, entry(2, 80))]);
        let d = ring_digest(&[0, 1, 1, 0, NO_BACKEND], &a);
        assert_eq!(d, ring_digest(&[7, 3, 3, 7, NO_BACKEND], &b));
        assert_eq!(d.len(), 40);
        assert!(d.bytes().all(|c| c.is_ascii_hexdigit()));
        // Another slot assignment, another port, another size: another digest.
        assert_ne!(d, ring_digest(&[1, 0, 1, 0, NO_BACKEND], &a));
        let c = BTreeMap::from([(0, entry(1, 81)), (1, entry(2, 80))]);
        assert_ne!(d, ring_digest(&[0, 1, 1, 0, NO_BACKEND], &c));
        assert_ne!(d, ring_digest(&[0, 1, 1, 0], &a));
    }

    #[test]
    fn an_empty_slot_and_an_unknown_id_hash_alike() {
        let a = BTreeMap::from([(0, entry(1, 80))]);
        assert_eq!(ring_digest(&[0, NO_BACKEND], &a), ring_digest(&[0, 42], &a));
    }
}
