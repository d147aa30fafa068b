//! Weighted Maglev lookup tables (pure, no I/O).
//!
//! Every backend gets a permutation of the `M` slots (`M` prime) from two
//! hashes of its identity: it prefers slot `offset`, then `offset + skip`,
//! `offset + 2·skip`, … (mod `M`). Backends take turns claiming their most
//! preferred free slot until the table is full; this is what keeps tables
//! identical on every host and moves few slots when the backend set changes.
//!
//! Weights decide whose turn it is: a backend's `k`-th claim (k = 0, 1, …)
//! happens at virtual time `k / weight`; at equal times heavier backends go
//! first, then identity order. Backends of equal weight share their times,
//! so a min-heap holds one entry per distinct weight: a build costs
//! `O(M log C)` heap work (`C` distinct weights; none when all are equal)
//! plus `O(M log M)` Maglev probing (half the usual probes, see
//! `FreeSlots`), never `O(M · N)`. Everybody claims at time 0, so each
//! backend with a positive weight owns a slot, and a backend's count `c`
//! obeys `q - N·w/W <= c <= q + 1`, where `q = M·w/W` is its fair share and
//! `W` the sum of weights: with `M >= 100·N` every share is within 1% of
//! fair, or within one slot.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

/// Value of a slot that no backend owns (only in the table of an empty set).
pub const EMPTY_SLOT: u32 = u32::MAX;

/// Default ring size: prime, and gives 655 backends 100 slots each.
pub const DEFAULT_RING_SIZE: u32 = 65_537;

/// Largest ring [`build`] accepts, ~64 MiB of `u32` per table: a guard rail
/// against a typo building (and pushing to the kernel) gigabytes. Equal to
/// the data plane's `abi::MAX_RING_SIZE` (the smallest prime above 2^24);
/// kept as a literal so this module stays free of dependencies.
pub const MAX_RING_SIZE: u32 = 16_777_259;

/// Slots per backend that [`ring_size_for`] guarantees: with this many, every
/// backend's share is within 1% (or one slot) of its weight's fair share.
pub const MIN_SLOTS_PER_BACKEND: u64 = 100;

/// Largest prime that fits in a `u32`.
pub const LARGEST_U32_PRIME: u32 = 4_294_967_291;

/// Hash seeds. Changing either (or [`hash64`]) changes every table on every
/// host, so mixed-version fleets would disagree: never change them.
const SEED_OFFSET: u64 = 0x5745_4952_4f46_4653; // "WEIROFFS"
const SEED_SKIP: u64 = 0x5745_4952_534b_4950; // "WEIRSKIP"

/// One backend as the builder sees it. `identity` is what makes tables agree
/// across hosts: the backend's address and port bytes (e.g. 4 IPv4 bytes + 2
/// port bytes, big endian), never a host-local id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// What the table stores; must not be [`EMPTY_SLOT`].
    pub id: u32,
    /// Address and port bytes; decides the slot permutation and tie order.
    pub identity: Vec<u8>,
    /// Relative share of slots; 0 means "owns no slot" (same table as if the
    /// member were absent), e.g. while draining.
    pub weight: u32,
}

/// Why a table cannot be built. Messages say what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("ring size {0} is not prime; Maglev needs a prime ring size such as 65537 or 1000003")]
    RingSizeNotPrime(u32),
    #[error(
        "ring size {size} is smaller than the {members} backends with a non-zero weight; \
         use a prime ring size of at least 100 x backends"
    )]
    RingTooSmall { size: u32, members: usize },
    #[error(
        "ring size {size} exceeds the maximum of {max} slots; use fewer backends per service \
         or a smaller ring"
    )]
    TooLarge { size: u32, max: u32 },
    #[error("backends {first} and {second} have the same address and port; list each backend once")]
    DuplicateIdentity { first: u32, second: u32 },
    #[error("backend id {0} is used by two backends with different addresses; ids must be unique")]
    DuplicateId(u32),
    #[error("backend id {0} is reserved to mark empty ring slots; use another id")]
    ReservedId(u32),
    #[error("backend {0} has an empty identity; it needs its address and port bytes")]
    EmptyIdentity(u32),
    #[error(
        "all {members} backends have weight 0, so the ring would route nothing; give at least \
         one backend a positive weight or remove the service"
    )]
    AllWeightsZero { members: usize },
}

/// Builds the table: entry `i` is the `id` of the member owning slot `i`.
///
/// - No members: every slot is [`EMPTY_SLOT`] (the service has no backend).
/// - Weight-0 members own no slot and do not influence the others (the table
///   is the one without them), but are still validated. If members exist but
///   all weigh 0 it is an error ([`MaglevError::AllWeightsZero`]): that is
///   more likely a mistake than a wish to blackhole the service.
/// - `size` must be prime, at most [`MAX_RING_SIZE`], and at least the number
///   of weighted members (each owns at least one slot); [`ring_size_for`]
///   gives the recommended size.
///
/// Deterministic: depends only on the set of `(identity, weight)` and on
/// `size`; ids are only what gets written, so input order and id values do
/// not affect which member owns which slot.
///
/// # Errors
/// A [`MaglevError`] if `size` is not prime, too large, or smaller than the
/// number of weighted members, or if the members are ambiguous (a duplicate
/// identity or id, the reserved id, an empty identity) or all weigh 0.
pub fn build(members: &[Member], size: u32) -> Result<Vec<u32>, MaglevError> {
    if size > MAX_RING_SIZE {
        return Err(MaglevError::TooLarge {
            size,
            max: MAX_RING_SIZE,
        });
    }
    if !is_prime(size) {
        return Err(MaglevError::RingSizeNotPrime(size));
    }
    let mut sorted: Vec<&Member> = members.iter().collect();
    validate(&mut sorted)?;
    // Identity order = tie order; weight-0 members drop out entirely.
    let active: Vec<&Member> = sorted.into_iter().filter(|m| m.weight > 0).collect();
    if active.is_empty() {
        if members.is_empty() {
            return Ok(vec![EMPTY_SLOT; size as usize]);
        }
        return Err(MaglevError::AllWeightsZero {
            members: members.len(),
        });
    }
    if active.len() > size as usize {
        return Err(MaglevError::RingTooSmall {
            size,
            members: active.len(),
        });
    }
    Ok(fill(&active, size))
}

/// Sorts by identity and rejects inputs whose table would be ambiguous.
/// Errors name the same ids whatever the input order.
fn validate(sorted: &mut [&Member]) -> Result<(), MaglevError> {
    if sorted.iter().any(|m| m.id == EMPTY_SLOT) {
        return Err(MaglevError::ReservedId(EMPTY_SLOT));
    }
    if let Some(id) = sorted
        .iter()
        .filter(|m| m.identity.is_empty())
        .map(|m| m.id)
        .min()
    {
        return Err(MaglevError::EmptyIdentity(id));
    }
    sorted.sort_unstable_by(|a, b| a.identity.cmp(&b.identity).then(a.id.cmp(&b.id)));
    if let Some(pair) = sorted.windows(2).find(|p| p[0].identity == p[1].identity) {
        return Err(MaglevError::DuplicateIdentity {
            first: pair[0].id,
            second: pair[1].id,
        });
    }
    let mut ids: Vec<u32> = sorted.iter().map(|m| m.id).collect();
    ids.sort_unstable();
    if let Some(pair) = ids.windows(2).find(|p| p[0] == p[1]) {
        return Err(MaglevError::DuplicateId(pair[0]));
    }
    Ok(())
}

/// The next turn of a weight class (all members of one weight, which share
/// their claim times): its `claims`-th round happens at virtual time
/// `claims / weight`. Ordered so that `BinaryHeap` (a max-heap) pops the
/// earliest turn first, and at equal times the heavier class.
struct Turn {
    claims: u32,
    weight: u32,
    /// Index into the classes' member ranges.
    class: u32,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        // claims <= MAX_RING_SIZE < 2^25, weight < 2^32: products fit in u64.
        let mine = u64::from(self.claims) * u64::from(other.weight);
        let theirs = u64::from(other.claims) * u64::from(self.weight);
        theirs.cmp(&mine).then(self.weight.cmp(&other.weight))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

/// Where a member is in its permutation of the slots.
struct Walk {
    next: u64,
    skip: u64,
    /// `skip⁻¹ mod M`, computed when first needed (0 until then).
    inverse: u64,
    id: u32,
}

/// The Maglev fill. `active` is sorted by identity, non-empty, all weights
/// positive, `active.len() <= size`, `size` prime.
fn fill(active: &[&Member], size: u32) -> Vec<u32> {
    let mut table = vec![EMPTY_SLOT; size as usize];
    let mut free = FreeSlots::new(size);
    let mut walks: Vec<Walk> = active
        .iter()
        .map(|member| {
            let (next, skip) = permutation(&member.identity, size);
            Walk {
                next,
                skip,
                inverse: 0,
                id: member.id,
            }
        })
        .collect();
    // Members grouped by weight (heaviest first), identity order inside a
    // group: one heap entry per distinct weight, not per member, so equal
    // weights cost no heap work per slot.
    let mut order: Vec<usize> = (0..active.len()).collect();
    order.sort_by_key(|&i| (Reverse(active[i].weight), i));
    let mut turns = BinaryHeap::new();
    let mut ranges = Vec::new();
    let mut start = 0;
    for end in 1..=order.len() {
        let weight = active[order[start]].weight;
        if end == order.len() || active[order[end]].weight != weight {
            turns.push(Turn {
                claims: 0,
                weight,
                class: ranges.len() as u32,
            });
            ranges.push(start..end);
            start = end;
        }
    }
    'fill: loop {
        let mut turn = turns.peek_mut().expect("active is not empty");
        for &i in &order[ranges[turn.class as usize].clone()] {
            let walk = &mut walks[i];
            let slot = free.claim(walk);
            table[slot as usize] = walk.id;
            if free.count == 0 {
                break 'fill;
            }
        }
        turn.claims += 1;
        // Dropping `turn` sifts it back into place.
    }
    table
}

/// The free slots, and the search for a walk's first free one. Two ways to
/// search give the same answer at different costs: stepping along the walk
/// costs about `M / free` probes per claim, which dominates once the table
/// is nearly full; comparing every free slot's distance along the walk
/// costs `free` steps. The fill steps while `free² > M` and compares after,
/// which halves the probes of a large table (`M·ln M` become about
/// `M·ln √M`); the probes saved, late ones that almost always hit a taken
/// slot, are the cheapest, so a table of 1,000,003 slots for 10,000
/// backends builds about 17% faster (29 → 24 ms here).
struct FreeSlots {
    m: u64,
    count: u32,
    /// Occupancy as a bitmap while stepping: most probes hit taken slots,
    /// and M/8 bytes stay in cache better than the M·4-byte table.
    taken: Vec<u64>,
    /// The free slots once few are left (any order); empty before, while
    /// the bitmap is in use.
    list: Vec<u32>,
    /// `⌊(2^64 - 1) / M⌋`, for remainders without a division.
    reciprocal: u64,
}

impl FreeSlots {
    fn new(size: u32) -> Self {
        let m = u64::from(size);
        Self {
            m,
            count: size,
            taken: vec![0; (size as usize).div_ceil(64)],
            list: Vec::new(),
            reciprocal: u64::MAX / m,
        }
    }

    /// Claims the first free slot on `walk`'s permutation and moves the walk
    /// past it. The table must not be full.
    fn claim(&mut self, walk: &mut Walk) -> u64 {
        let stepping = self.list.is_empty();
        let slot = if stepping {
            self.step(walk)
        } else {
            self.nearest(walk)
        };
        self.count -= 1;
        if stepping && self.count > 0 && u64::from(self.count).pow(2) <= self.m {
            let taken = std::mem::take(&mut self.taken);
            self.list = (0..self.m as u32)
                .filter(|&s| taken[(s / 64) as usize] & (1 << (s % 64)) == 0)
                .collect();
        }
        walk.next = self.add(slot, walk.skip);
        slot
    }

    /// Steps along the walk until a free slot, which it marks taken. `skip`
    /// is in 1..M and M is prime, so the walk visits every slot: it finds a
    /// free one as long as the table is not full.
    fn step(&mut self, walk: &Walk) -> u64 {
        let mut slot = walk.next;
        loop {
            let (word, bit) = ((slot / 64) as usize, 1u64 << (slot % 64));
            if self.taken[word] & bit == 0 {
                self.taken[word] |= bit;
                return slot;
            }
            slot = self.add(slot, walk.skip);
        }
    }

    /// The free slot fewest steps ahead on the walk, removed from the list:
    /// from `next`, slot `s` is `(s - next)·skip⁻¹ mod M` steps away, and
    /// distinct slots are distinct distances.
    fn nearest(&mut self, walk: &mut Walk) -> u64 {
        if walk.inverse == 0 {
            walk.inverse = inverse_mod(walk.skip, self.m);
        }
        let (mut best, mut best_distance) = (0, u64::MAX);
        for (i, &s) in self.list.iter().enumerate() {
            let ahead = self.sub(u64::from(s), walk.next);
            let distance = self.reduce(ahead * walk.inverse);
            if distance < best_distance {
                (best, best_distance) = (i, distance);
            }
        }
        u64::from(self.list.swap_remove(best))
    }

    /// `(a + b) mod M` for `a, b < M`.
    fn add(&self, a: u64, b: u64) -> u64 {
        let sum = a + b;
        if sum >= self.m { sum - self.m } else { sum }
    }

    /// `(a - b) mod M` for `a, b < M`.
    fn sub(&self, a: u64, b: u64) -> u64 {
        if a >= b { a - b } else { a + self.m - b }
    }

    /// `x mod M` for `x < M²` (Barrett: the estimated quotient is at most
    /// one short).
    fn reduce(&self, x: u64) -> u64 {
        let quotient = ((u128::from(x) * u128::from(self.reciprocal)) >> 64) as u64;
        let r = x - quotient * self.m;
        if r >= self.m { r - self.m } else { r }
    }
}

/// `a⁻¹ mod m` for `0 < a < m`, `m` prime (extended Euclid).
fn inverse_mod(a: u64, m: u64) -> u64 {
    let (mut r0, mut r1) = (m as i64, a as i64);
    let (mut t0, mut t1) = (0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(m as i64) as u64
}

/// `(offset, skip)` of an identity's permutation of a ring of `size` slots:
/// `offset` in `0..size`, `skip` in `1..size` (so that, `size` being prime,
/// the walk visits every slot). Two independently seeded hashes, so that
/// backends sharing an offset still diverge.
fn permutation(identity: &[u8], size: u32) -> (u64, u64) {
    let m = u64::from(size);
    let offset = hash64(SEED_OFFSET, identity) % m;
    let skip = if m > 1 {
        hash64(SEED_SKIP, identity) % (m - 1) + 1
    } else {
        1
    };
    (offset, skip)
}

/// A seeded 64-bit hash, stable across platforms and releases (explicit
/// little-endian word loads, no std hasher): tables must agree between hosts
/// and between versions during an upgrade.
fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = mix64(seed ^ (bytes.len() as u64).wrapping_mul(GOLDEN));
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix64(h ^ u64::from_le_bytes(word)).wrapping_add(GOLDEN);
    }
    mix64(h)
}

/// A bijective 64-bit finalizer with full avalanche (the xor-shift/multiply
/// structure of SplitMix64's output function).
fn mix64(mut z: u64) -> u64 {
    z ^= z >> 30;
    z = z.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic Miller–Rabin: bases 2, 7 and 61 are exact for every
/// `n < 4_759_123_141`, hence for every `u32`.
#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    for p in [
        2u32, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61,
    ] {
        if n == p {
            return true;
        }
        if n.is_multiple_of(p) {
            return false;
        }
    }
    let n = u64::from(n);
    let mut d = n - 1;
    let mut s = 0;
    while d % 2 == 0 {
        d /= 2;
        s += 1;
    }
    'bases: for a in [2u64, 7, 61] {
        let mut x = pow_mod(a, d, n);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = x * x % n;
            if x == n - 1 {
                continue 'bases;
            }
        }
        return false;
    }
    true
}

/// `base^exp mod m` for `m < 2^32` (products stay below 2^64).
fn pow_mod(mut base: u64, mut exp: u64, m: u64) -> u64 {
    let mut acc = 1;
    base %= m;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = acc * base % m;
        }
        base = base * base % m;
        exp >>= 1;
    }
    acc
}

/// Smallest prime `>= n`, or `None` above [`LARGEST_U32_PRIME`].
#[must_use]
pub fn checked_next_prime(n: u32) -> Option<u32> {
    if n <= 2 {
        return Some(2);
    }
    let mut candidate = n | 1;
    loop {
        if is_prime(candidate) {
            return Some(candidate);
        }
        candidate = candidate.checked_add(2)?;
    }
}

/// Smallest prime `>= n`.
///
/// # Panics
/// If `n > LARGEST_U32_PRIME` (no such `u32`); see [`checked_next_prime`].
#[must_use]
pub fn next_prime(n: u32) -> u32 {
    checked_next_prime(n).unwrap_or_else(|| panic!("no u32 prime is >= {n}"))
}

/// Smallest prime ring size that satisfies the ">= 100 slots per backend" rule
/// for `backends` backends, at least 65537 ([`DEFAULT_RING_SIZE`]).
///
/// The result may exceed [`MAX_RING_SIZE`] (above ~167k backends); [`build`]
/// then refuses it with an error that says so rather than silently giving
/// backends fewer slots. Beyond what a `u32` holds it saturates at
/// [`LARGEST_U32_PRIME`], which [`build`] refuses the same way.
#[must_use]
pub fn ring_size_for(backends: usize) -> u32 {
    let wanted = (backends as u64)
        .saturating_mul(MIN_SLOTS_PER_BACKEND)
        .max(u64::from(DEFAULT_RING_SIZE));
    u32::try_from(wanted)
        .ok()
        .and_then(checked_next_prime)
        .unwrap_or(LARGEST_U32_PRIME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// IPv4 10.x.y.z:8080 as 4 address + 2 port bytes, big endian.
    fn identity(n: u32) -> Vec<u8> {
        let mut v = (0x0a00_0000 | n).to_be_bytes().to_vec();
        v.extend_from_slice(&8080u16.to_be_bytes());
        v
    }

    fn member(n: u32, weight: u32) -> Member {
        Member {
            id: n,
            identity: identity(n),
            weight,
        }
    }

    fn equal(n: u32) -> Vec<Member> {
        (0..n).map(|i| member(i, 1)).collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, u64> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_insert(0) += 1;
        }
        c
    }

    /// Asserts each member's count is within `max(1% of fair, 1 slot)` of its
    /// fair share `M·w/W`. The 1-slot floor exists because counts are
    /// integers: a fair share of 60.4 slots cannot be met to within 0.6.
    fn assert_proportional(members: &[Member], size: u32) {
        let table = build(members, size).unwrap();
        let c = counts(&table);
        let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
        for m in members {
            let fair = f64::from(size) * f64::from(m.weight) / total as f64;
            let got = *c.get(&m.id).unwrap_or(&0) as f64;
            let tolerance = (0.01 * fair).max(1.0);
            assert!(
                (got - fair).abs() <= tolerance,
                "member {} weight {}: {got} slots, fair {fair:.2}, tolerance {tolerance:.2}",
                m.id,
                m.weight
            );
        }
    }

    /// Fraction of slots whose owner differs.
    fn changed(a: &[u32], b: &[u32]) -> f64 {
        let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
        n as f64 / a.len() as f64
    }

    #[test]
    fn equal_backends_get_fair_shares_within_one_percent() {
        let members = equal(100);
        let table = build(&members, DEFAULT_RING_SIZE).unwrap();
        assert_eq!(table.len(), DEFAULT_RING_SIZE as usize);
        let c = counts(&table);
        assert_eq!(c.len(), 100);
        let fair = f64::from(DEFAULT_RING_SIZE) / 100.0;
        for (id, &n) in &c {
            assert!(
                (n as f64 - fair).abs() <= 0.01 * fair,
                "backend {id}: {n} slots, fair {fair}"
            );
        }
    }

    #[test]
    fn equal_weights_differ_by_at_most_one_slot() {
        // Round robin with equal weights: counts are floor or ceil of M/N.
        for n in [3, 7, 100, 655] {
            let c = counts(&build(&equal(n), DEFAULT_RING_SIZE).unwrap());
            let lo = c.values().min().unwrap();
            let hi = c.values().max().unwrap();
            assert!(hi - lo <= 1, "n={n}: {lo}..{hi}");
        }
    }

    #[test]
    fn weights_one_to_ten_are_honoured() {
        let members: Vec<Member> = (1..=10).map(|w| member(w, w)).collect();
        assert_proportional(&members, DEFAULT_RING_SIZE);
    }

    #[test]
    fn skewed_weights_are_honoured() {
        let members: Vec<Member> = [1, 1, 2, 4, 100]
            .iter()
            .enumerate()
            .map(|(i, &w)| member(i as u32, w))
            .collect();
        assert_proportional(&members, DEFAULT_RING_SIZE);
        // A weight 1000 times smaller than the rest still gets its share.
        let mut members: Vec<Member> = (0..20).map(|i| member(i, 1000)).collect();
        members.push(member(99, 1));
        assert_proportional(&members, DEFAULT_RING_SIZE);
        // Large weights do not overflow the virtual-time products.
        let members = vec![member(0, u32::MAX), member(1, u32::MAX / 3), member(2, 1)];
        assert_proportional(&members, DEFAULT_RING_SIZE);
    }

    #[test]
    fn weight_scaling_does_not_change_the_table() {
        // Only ratios matter: operators may write 1/2/3 or 100/200/300.
        let a: Vec<Member> = (0..30).map(|i| member(i, 1 + i % 3)).collect();
        let b: Vec<Member> = (0..30).map(|i| member(i, 100 * (1 + i % 3))).collect();
        assert_eq!(
            build(&a, DEFAULT_RING_SIZE).unwrap(),
            build(&b, DEFAULT_RING_SIZE).unwrap()
        );
    }

    #[test]
    fn large_ring_with_many_backends() {
        let members: Vec<Member> = (0..10_000).map(|i| member(i, 1 + i % 4)).collect();
        let size = ring_size_for(members.len());
        assert_eq!(size, 1_000_003);
        assert_proportional(&members, size);
    }

    // Disruption: with equal weights this is plain Maglev. Measured with this
    // hash at M = 65537, removing each backend in turn, the slots that move
    // between surviving backends (on top of the removed one's ~1/N, which
    // must move) are at most 0.23% of the ring for N = 10, 0.60% for
    // N = 50, 0.64% for N = 100 (0.83% for N = 655, the 100-slot limit;
    // 0.09% for N = 10000 at M = 1000003). Total change: at most 1.02/N,
    // 1.30/N and 1.64/N. Adding an 11th, 51st or 101st backend moves at most
    // 0.56%, 0.48%, 0.59% of the ring between the old ones. Asserted: total
    // <= 1.5/N + 0.2%, survivors' churn below these bounds on removal and
    // below ADD_CHURN on addition.
    const DISRUPTION: [(u32, f64); 3] = [(10, 0.003), (50, 0.007), (100, 0.0075)];
    const ADD_CHURN: f64 = 0.0065;

    #[test]
    fn removing_a_backend_moves_few_slots() {
        for (n, survivor_bound) in DISRUPTION {
            let all = equal(n);
            let before = build(&all, DEFAULT_RING_SIZE).unwrap();
            for removed in 0..n {
                let rest: Vec<Member> = all.iter().filter(|m| m.id != removed).cloned().collect();
                let after = build(&rest, DEFAULT_RING_SIZE).unwrap();
                assert!(!after.contains(&removed));
                let total = changed(&before, &after);
                let survivors = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| **b != removed && b != a)
                    .count() as f64
                    / before.len() as f64;
                let nf = f64::from(n);
                assert!(
                    total <= 1.5 / nf + 0.002,
                    "n={n} removed={removed}: {total:.4} of slots changed"
                );
                assert!(
                    survivors <= survivor_bound,
                    "n={n} removed={removed}: {survivors:.4} moved between survivors"
                );
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_few_slots() {
        for (n, _) in DISRUPTION {
            let before = build(&equal(n), DEFAULT_RING_SIZE).unwrap();
            for new in (0..10).map(|k| 1000 + 17 * k) {
                let mut more = equal(n);
                more.push(member(new, 1));
                let after = build(&more, DEFAULT_RING_SIZE).unwrap();
                let total = changed(&before, &after);
                let not_to_new = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| b != a && **a != new)
                    .count() as f64
                    / before.len() as f64;
                let nf = f64::from(n + 1);
                assert!(total <= 1.5 / nf + 0.002, "n={n}: {total:.4} changed");
                assert!(total >= 0.99 / nf, "n={n}: the new backend got {total:.4}");
                assert!(not_to_new <= ADD_CHURN, "n={n}: {not_to_new:.4}");
            }
        }
    }

    #[test]
    fn removing_a_weighted_backend_moves_few_slots() {
        // Weights 1..5, N = 50: measured survivors' churn at most 0.54x the
        // removed backend's own share.
        let all: Vec<Member> = (0..50).map(|i| member(i, 1 + i % 5)).collect();
        let before = build(&all, DEFAULT_RING_SIZE).unwrap();
        for removed in 0..50 {
            let rest: Vec<Member> = all.iter().filter(|m| m.id != removed).cloned().collect();
            let after = build(&rest, DEFAULT_RING_SIZE).unwrap();
            let own = before.iter().filter(|&&id| id == removed).count();
            let survivors = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b != removed && b != a)
                .count();
            assert!(
                survivors as f64 <= 0.6 * own as f64,
                "removed {removed}: {survivors} survivor slots moved, it owned {own}"
            );
        }
    }

    #[test]
    fn changing_one_weight_moves_slots_mostly_to_or_from_it() {
        // Doubling one of 20 equal weights: it gains ~1/21 of the ring. Allow
        // as much churn again among the others (weights shift every turn).
        let before = build(&equal(20), DEFAULT_RING_SIZE).unwrap();
        let mut heavier = equal(20);
        heavier[5].weight = 2;
        let after = build(&heavier, DEFAULT_RING_SIZE).unwrap();
        let gained = counts(&after)[&5] as f64 - counts(&before)[&5] as f64;
        let expected_gain = f64::from(DEFAULT_RING_SIZE) * (2.0 / 21.0 - 1.0 / 20.0);
        assert!((gained - expected_gain).abs() <= 0.01 * expected_gain);
        assert!(changed(&before, &after) <= 2.0 * expected_gain / f64::from(DEFAULT_RING_SIZE));
    }

    #[test]
    fn weight_zero_member_is_as_if_absent() {
        let mut members = equal(10);
        let without = build(&members, DEFAULT_RING_SIZE).unwrap();
        members.push(member(42, 0));
        let with = build(&members, DEFAULT_RING_SIZE).unwrap();
        assert_eq!(with, without);
        assert!(!with.contains(&42));
    }

    #[test]
    fn all_weights_zero_is_an_error() {
        let members = vec![member(1, 0), member(2, 0)];
        assert_eq!(
            build(&members, DEFAULT_RING_SIZE),
            Err(MaglevError::AllWeightsZero { members: 2 })
        );
    }

    #[test]
    fn same_input_same_table() {
        let members: Vec<Member> = (0..37).map(|i| member(i * 3, 1 + i % 5)).collect();
        let a = build(&members, 4099).unwrap();
        let b = build(&members.clone(), 4099).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn input_order_does_not_matter() {
        let members: Vec<Member> = (0..37).map(|i| member(i, 1 + i % 5)).collect();
        let base = build(&members, 4099).unwrap();
        let mut reversed = members.clone();
        reversed.reverse();
        assert_eq!(build(&reversed, 4099).unwrap(), base);
        // A fixed pseudo-random shuffle (no RNG dependency needed).
        let mut shuffled = members.clone();
        for i in (1..shuffled.len()).rev() {
            let j = (mix64(i as u64) % (i as u64 + 1)) as usize;
            shuffled.swap(i, j);
        }
        assert_ne!(shuffled, members);
        assert_eq!(build(&shuffled, 4099).unwrap(), base);
    }

    #[test]
    fn ids_are_only_labels() {
        // Two hosts that number the same backends differently build tables
        // that agree once ids are translated.
        let members: Vec<Member> = (0..25).map(|i| member(i, 1 + i % 3)).collect();
        let relabel = |id: u32| 1_000_000 + (id * 7919) % 25;
        let other: Vec<Member> = members
            .iter()
            .map(|m| Member {
                id: relabel(m.id),
                ..m.clone()
            })
            .collect();
        let a = build(&members, 1009).unwrap();
        let b = build(&other, 1009).unwrap();
        let translated: Vec<u32> = a.iter().map(|&id| relabel(id)).collect();
        assert_eq!(b, translated);
    }

    #[test]
    fn identity_decides_the_table_not_the_id() {
        // Same ids, different addresses: a different table.
        let a: Vec<Member> = (0..10).map(|i| member(i, 1)).collect();
        let b: Vec<Member> = (0..10)
            .map(|i| Member {
                identity: identity(i + 100),
                ..member(i, 1)
            })
            .collect();
        assert_ne!(build(&a, 1009).unwrap(), build(&b, 1009).unwrap());
    }

    #[test]
    fn golden_tables_are_stable() {
        // Pins the hash and the fill: if these change, hosts running
        // different releases build different tables and a failover moves
        // connections. Never update them without a migration plan.
        assert_eq!(hash64(SEED_OFFSET, &identity(1)), GOLDEN_HASH_OFFSET);
        assert_eq!(hash64(SEED_SKIP, &identity(1)), GOLDEN_HASH_SKIP);
        assert_eq!(hash64(SEED_OFFSET, &[0; 17]), GOLDEN_HASH_LONG);
        let members: Vec<Member> = (0..5).map(|i| member(i, i + 1)).collect();
        assert_eq!(build(&members, 13).unwrap(), GOLDEN_13);
        let members: Vec<Member> = (0..10).map(|i| member(i, 1 + i % 4)).collect();
        let table = build(&members, DEFAULT_RING_SIZE).unwrap();
        let bytes: Vec<u8> = table.iter().flat_map(|id| id.to_le_bytes()).collect();
        assert_eq!(hash64(0, &bytes), GOLDEN_DIGEST_65537);
    }
    const GOLDEN_HASH_OFFSET: u64 = 0xc61d_a20e_75c5_3781;
    const GOLDEN_HASH_SKIP: u64 = 0x476d_ea13_6538_6dab;
    const GOLDEN_HASH_LONG: u64 = 0xa5a0_4c23_f085_13ab;
    const GOLDEN_13: [u32; 13] = [4, 2, 2, 2, 3, 4, 4, 3, 4, 0, 1, 1, 3];
    const GOLDEN_DIGEST_65537: u64 = 0xa62e_4da8_c2ae_4a5a;

    #[test]
    fn empty_set_fills_every_slot_with_the_marker() {
        let table = build(&[], 251).unwrap();
        assert_eq!(table, vec![EMPTY_SLOT; 251]);
        // The size is still validated.
        assert_eq!(build(&[], 250), Err(MaglevError::RingSizeNotPrime(250)));
    }

    #[test]
    fn single_backend_owns_everything() {
        let table = build(&[member(7, 3)], DEFAULT_RING_SIZE).unwrap();
        assert!(table.iter().all(|&id| id == 7));
        assert_eq!(build(&[member(7, 1)], 2).unwrap(), vec![7, 7]);
    }

    #[test]
    fn size_must_be_prime() {
        for size in [0, 1, 4, 65536, 1_000_000] {
            assert_eq!(
                build(&equal(1), size),
                Err(MaglevError::RingSizeNotPrime(size))
            );
        }
    }

    #[test]
    fn size_must_cover_every_weighted_member() {
        assert_eq!(
            build(&equal(12), 11),
            Err(MaglevError::RingTooSmall {
                size: 11,
                members: 12
            })
        );
        // Exactly one slot each is allowed; weight-0 members do not count.
        let c = counts(&build(&equal(11), 11).unwrap());
        assert!(c.len() == 11 && c.values().all(|&n| n == 1));
        let mut members = equal(11);
        members.push(member(50, 0));
        assert!(build(&members, 11).is_ok());
    }

    #[test]
    fn size_is_capped() {
        assert!(is_prime(MAX_RING_SIZE));
        // Accepted (the error comes from a later check), without the cost of
        // filling 16M slots in a debug build.
        assert_eq!(
            build(&[member(3, 0)], MAX_RING_SIZE),
            Err(MaglevError::AllWeightsZero { members: 1 })
        );
        let too_big = next_prime(MAX_RING_SIZE + 1);
        assert_eq!(
            build(&equal(1), too_big),
            Err(MaglevError::TooLarge {
                size: too_big,
                max: MAX_RING_SIZE
            })
        );
        assert!(matches!(
            build(&equal(1), LARGEST_U32_PRIME),
            Err(MaglevError::TooLarge { .. })
        ));
    }

    #[test]
    fn duplicate_identity_is_rejected() {
        let mut members = equal(5);
        members.push(Member {
            id: 9,
            identity: identity(2),
            weight: 4,
        });
        assert_eq!(
            build(&members, 251),
            Err(MaglevError::DuplicateIdentity {
                first: 2,
                second: 9
            })
        );
        // The same member listed twice too.
        let mut members = equal(5);
        members.push(member(3, 1));
        assert_eq!(
            build(&members, 251),
            Err(MaglevError::DuplicateIdentity {
                first: 3,
                second: 3
            })
        );
        // Also when one of them weighs 0: the input is wrong either way.
        let mut members = equal(5);
        members.push(Member {
            weight: 0,
            ..member(1, 1)
        });
        members[5].id = 77;
        assert!(matches!(
            build(&members, 251),
            Err(MaglevError::DuplicateIdentity { .. })
        ));
    }

    #[test]
    fn errors_do_not_depend_on_input_order() {
        let mut members = equal(6);
        for (k, id) in [40, 30, 50].into_iter().enumerate() {
            members.push(Member {
                id,
                identity: identity(2),
                weight: k as u32,
            });
        }
        members[4].identity.clear();
        members[1].identity.clear();
        let mut dup = members.clone();
        dup[1].identity = identity(1);
        dup[4].identity = identity(4);
        for _ in 0..members.len() {
            assert_eq!(build(&members, 251), Err(MaglevError::EmptyIdentity(1)));
            assert_eq!(
                build(&dup, 251),
                Err(MaglevError::DuplicateIdentity {
                    first: 2,
                    second: 30
                })
            );
            members.rotate_left(1);
            dup.rotate_left(1);
        }
    }

    #[test]
    fn duplicate_id_reserved_id_and_empty_identity_are_rejected() {
        let mut members = equal(5);
        members[4].id = 1;
        assert_eq!(build(&members, 251), Err(MaglevError::DuplicateId(1)));
        let mut members = equal(5);
        members[0].id = EMPTY_SLOT;
        assert_eq!(
            build(&members, 251),
            Err(MaglevError::ReservedId(EMPTY_SLOT))
        );
        let mut members = equal(5);
        members[3].identity.clear();
        assert_eq!(build(&members, 251), Err(MaglevError::EmptyIdentity(3)));
    }

    #[test]
    fn errors_tell_the_operator_what_to_do() {
        let msg = MaglevError::RingSizeNotPrime(65536).to_string();
        assert!(msg.contains("65536") && msg.contains("65537"), "{msg}");
        let msg = MaglevError::RingTooSmall {
            size: 11,
            members: 12,
        }
        .to_string();
        assert!(msg.contains("100 x backends"), "{msg}");
        let msg = MaglevError::DuplicateIdentity {
            first: 1,
            second: 2,
        }
        .to_string();
        assert!(msg.contains("1 and 2"), "{msg}");
    }

    #[test]
    fn is_prime_matches_a_sieve() {
        const LIMIT: usize = 200_000;
        let mut sieve = vec![true; LIMIT];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..LIMIT {
            if sieve[i] {
                for j in (i * i..LIMIT).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (n, &prime) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), prime, "{n}");
        }
    }

    /// Reference primality by trial division (slow, obviously correct).
    fn is_prime_slow(n: u32) -> bool {
        let n = u64::from(n);
        n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
    }

    #[test]
    fn is_prime_on_large_and_tricky_values() {
        for p in [
            65_537,
            1_000_003,
            16_777_213,
            2_147_483_647,
            LARGEST_U32_PRIME,
        ] {
            assert!(is_prime(p), "{p}");
        }
        // Carmichael numbers and strong pseudoprimes to small bases (e.g.
        // 3215031751 fools bases 2, 3, 5 and 7), squares of primes, u32::MAX.
        let tricky = [
            561,
            2_047,
            3_277,
            1_373_653,
            25_326_001,
            3_215_031_751,
            65_521 * 65_521,
            65_537 * 65_521,
            u32::MAX,
        ];
        for c in tricky {
            assert!(!is_prime_slow(c), "{c} is composite");
            assert!(!is_prime(c), "{c}");
        }
        // Windows near the top of the range and around common ring sizes.
        for start in [u32::MAX - 2_000, 1 << 31, 16_777_000, 999_900] {
            for n in start..=start.saturating_add(2_000) {
                assert_eq!(is_prime(n), is_prime_slow(n), "{n}");
            }
        }
    }

    #[test]
    fn next_prime_values() {
        assert_eq!(next_prime(0), 2);
        assert_eq!(next_prime(2), 2);
        assert_eq!(next_prime(3), 3);
        assert_eq!(next_prime(4), 5);
        assert_eq!(next_prime(65_536), 65_537);
        assert_eq!(next_prime(65_537), 65_537);
        assert_eq!(next_prime(65_538), 65_539);
        assert_eq!(next_prime(1_000_000), 1_000_003);
        assert_eq!(next_prime(LARGEST_U32_PRIME - 1), LARGEST_U32_PRIME);
        assert_eq!(checked_next_prime(LARGEST_U32_PRIME + 1), None);
        assert_eq!(checked_next_prime(u32::MAX), None);
    }

    #[test]
    #[should_panic(expected = "no u32 prime")]
    fn next_prime_panics_past_the_largest_u32_prime() {
        let _ = next_prime(u32::MAX);
    }

    #[test]
    fn ring_size_for_values() {
        assert_eq!(ring_size_for(0), 65_537);
        assert_eq!(ring_size_for(1), 65_537);
        assert_eq!(ring_size_for(100), 65_537);
        assert_eq!(ring_size_for(655), 65_537);
        assert_eq!(ring_size_for(656), next_prime(65_600));
        let big = ring_size_for(10_000);
        assert!(big >= 1_000_000 && is_prime(big));
        assert_eq!(big, 1_000_003);
        for n in [1usize, 99, 656, 1234, 10_000, 100_000, 200_000] {
            let m = ring_size_for(n);
            assert!(is_prime(m) && u64::from(m) >= 100 * n as u64, "{n}");
            // Smallest such prime.
            assert!(
                (u64::from(DEFAULT_RING_SIZE).max(100 * n as u64)..u64::from(m))
                    .all(|k| !is_prime(k as u32)),
                "{n}"
            );
        }
        assert_eq!(ring_size_for(usize::MAX), LARGEST_U32_PRIME);
    }

    /// The algorithm as the module doc states it, with no grouping, heap,
    /// or bitmap: each step, a linear scan picks the member with the
    /// earliest `claims / weight`, heavier first, then identity order.
    fn reference(members: &[Member], size: u32) -> Vec<u32> {
        let mut active: Vec<&Member> = members.iter().filter(|m| m.weight > 0).collect();
        active.sort_by(|a, b| a.identity.cmp(&b.identity));
        let m = u64::from(size);
        let mut claims = vec![0u64; active.len()];
        let mut walked = vec![0u64; active.len()];
        let mut table = vec![EMPTY_SLOT; size as usize];
        for _ in 0..size {
            let mut best = 0;
            for i in 1..active.len() {
                let (wi, wb) = (u64::from(active[i].weight), u64::from(active[best].weight));
                let (ti, tb) = (claims[i] * wb, claims[best] * wi);
                if ti < tb || (ti == tb && wi > wb) {
                    best = i;
                }
            }
            let (offset, skip) = permutation(&active[best].identity, size);
            loop {
                let slot = ((offset + walked[best] * skip) % m) as usize;
                walked[best] += 1;
                if table[slot] == EMPTY_SLOT {
                    table[slot] = active[best].id;
                    break;
                }
            }
            claims[best] += 1;
        }
        table
    }

    #[test]
    fn last_slots_go_where_stepping_would_put_them() {
        // Far more members than the free slots left when the fill switches
        // from stepping to comparing distances (31 of 1009): most of the
        // last claims race for few slots.
        let members: Vec<Member> = (0..300).map(|i| member(i * 7, 1 + i % 3)).collect();
        assert_eq!(build(&members, 1009).unwrap(), reference(&members, 1009));
        let equal: Vec<Member> = (0..1000).map(|i| member(i, 1)).collect();
        assert_eq!(build(&equal, 1009).unwrap(), reference(&equal, 1009));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn every_slot_owned_and_every_member_served(
            weights in proptest::collection::vec(1u32..=20, 1..50),
            size in proptest::sample::select(vec![251u32, 1009, 4099]),
            salt in any::<u32>(),
        ) {
            let members: Vec<Member> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Member {
                    id: i as u32,
                    identity: [salt.to_be_bytes(), (i as u32).to_be_bytes()].concat(),
                    weight: w,
                })
                .collect();
            let table = build(&members, size).unwrap();
            prop_assert_eq!(table.len(), size as usize);
            let c = counts(&table);
            prop_assert!(table.iter().all(|&id| (id as usize) < members.len()));
            prop_assert_eq!(c.len(), members.len());
            // The apportionment bound from the module doc:
            // fair - N·w/W <= count <= fair + 1.
            let n = members.len() as f64;
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            for m in &members {
                let w = f64::from(m.weight);
                let fair = f64::from(size) * w / total;
                let got = c[&m.id] as f64;
                prop_assert!(got <= fair + 1.0 + 1e-9, "{} > {} + 1", got, fair);
                prop_assert!(got >= fair - n * w / total - 1e-9, "{} < {}", got, fair);
            }
        }

        #[test]
        fn matches_a_naive_reference(
            weights in proptest::collection::vec(0u32..=6, 1..40),
            size in proptest::sample::select(vec![41u32, 251, 1009]),
        ) {
            let members: Vec<Member> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| member(i as u32 * 11, w))
                .collect();
            let fast = build(&members, size);
            if weights.iter().any(|&w| w > 0) && weights.len() <= size as usize {
                prop_assert_eq!(fast.unwrap(), reference(&members, size));
            } else {
                prop_assert!(fast.is_err());
            }
        }

        #[test]
        fn order_and_zero_weights_never_matter(
            weights in proptest::collection::vec(0u32..=5, 2..30),
            rotate in 0usize..30,
        ) {
            let members: Vec<Member> = weights
                .iter()
                .enumerate()
                .map(|(i, &w)| member(i as u32, w))
                .collect();
            let mut rotated = members.clone();
            let r = rotate % rotated.len();
            rotated.rotate_left(r);
            let positive: Vec<Member> =
                members.iter().filter(|m| m.weight > 0).cloned().collect();
            let a = build(&members, 1009);
            prop_assert_eq!(&a, &build(&rotated, 1009));
            if positive.is_empty() {
                prop_assert!(
                    matches!(a, Err(MaglevError::AllWeightsZero { .. })),
                    "expected AllWeightsZero, got {:?}",
                    a
                );
            } else {
                prop_assert_eq!(a, build(&positive, 1009));
            }
        }
    }
}
