//! A worker's connection table: numbered slots that never move.
//!
//! Slots live in fixed-size chunks. A table that grows adds a chunk and
//! copies nothing, so growth costs no more memory than the slots themselves:
//! a plain `Vec` doubling past tens of thousands of connections copies the
//! whole table and leaves the old copy resident in the allocator, half as
//! much memory again per connection.

use std::ops::{Index, IndexMut};

/// Slots per chunk.
const CHUNK: usize = 256;

pub struct Table<T> {
    chunks: Vec<Box<[Option<T>]>>,
    len: usize,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Table<T> {
    /// Number of slots (empty or not).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds an empty slot and returns its number.
    pub fn push_empty(&mut self) -> usize {
        if self.len == self.chunks.len() * CHUNK {
            self.chunks
                .push(std::iter::repeat_with(|| None).take(CHUNK).collect());
        }
        self.len += 1;
        self.len - 1
    }

    /// Slot `i`, or None past the end.
    pub fn get(&self, i: usize) -> Option<&Option<T>> {
        (i < self.len).then(|| &self.chunks[i / CHUNK][i % CHUNK])
    }

    /// Slot `i` to change, or None past the end.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut Option<T>> {
        (i < self.len).then(|| &mut self.chunks[i / CHUNK][i % CHUNK])
    }

    /// Every slot in order.
    pub fn iter(&self) -> impl Iterator<Item = &Option<T>> {
        self.chunks.iter().flat_map(|c| c.iter()).take(self.len)
    }

    /// Every slot in order, to change.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Option<T>> {
        self.chunks
            .iter_mut()
            .flat_map(|c| c.iter_mut())
            .take(self.len)
    }
}

impl<T> Index<usize> for Table<T> {
    type Output = Option<T>;

    fn index(&self, i: usize) -> &Option<T> {
        assert!(i < self.len, "slot {i} of {}", self.len);
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl<T> IndexMut<usize> for Table<T> {
    fn index_mut(&mut self, i: usize) -> &mut Option<T> {
        assert!(i < self.len, "slot {i} of {}", self.len);
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_numbered_in_order_and_stay_put() {
        let mut t: Table<u64> = Table::default();
        assert!(t.is_empty());
        for i in 0..(3 * CHUNK + 5) {
            assert_eq!(t.push_empty(), i);
            t[i] = Some(i as u64 * 7);
        }
        let first: *const Option<u64> = &t[0];
        for _ in 0..CHUNK {
            t.push_empty();
        }
        assert!(std::ptr::eq(first, &t[0]), "growth moved nothing");
        assert_eq!(t.len(), 4 * CHUNK + 5);
        assert_eq!(t[2 * CHUNK + 1], Some((2 * CHUNK as u64 + 1) * 7));
        assert_eq!(t[4 * CHUNK + 4], None, "new slots are empty");
        assert_eq!(t.get(CHUNK + 1), Some(&Some((CHUNK as u64 + 1) * 7)));
        assert_eq!(t.get(t.len()), None);
        assert_eq!(t.iter().count(), t.len());
        assert_eq!(t.iter().filter(|s| s.is_some()).count(), 3 * CHUNK + 5);
        t[5] = None;
        assert_eq!(t.iter().flatten().count(), 3 * CHUNK + 4);
        for (i, slot) in t.iter_mut().enumerate() {
            if let Some(v) = slot {
                *v = i as u64;
            }
        }
        assert_eq!(t.iter_mut().count(), t.len());
        assert_eq!(t[3 * CHUNK + 2], Some(3 * CHUNK as u64 + 2));
    }

    #[test]
    #[should_panic(expected = "slot 0 of 0")]
    fn a_slot_past_the_end_is_a_bug() {
        let t: Table<u8> = Table::default();
        let _ = &t[0];
    }
}
