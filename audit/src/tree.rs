//! The Merkle tree of RFC 6962 §2.1 / RFC 9162 §2.1, over leaf hashes.
//!
//! The tree keeps every *complete, aligned* subtree hash, level by level: level 0 holds the
//! leaf hashes, level `k` holds `MTH(D[i·2^k : (i+1)·2^k])` for every `i` whose subtree is
//! complete. An append pushes one leaf hash and then one parent per level while the level
//! has an even length, so appends are amortized O(1) and the whole structure holds at most
//! `2n` hashes. The hash of any other range (a "ragged" right edge, or the root of an older
//! tree size) is combined from at most `log2 n` stored complete subtrees, so roots of past
//! sizes and proofs against them cost O(log n) stored look-ups plus O(log n) hashes.

use std::marker::PhantomData;

use rayon::prelude::*;

use crate::proof::{ConsistencyProof, InclusionProof, ProofError};

/// A 32-byte digest: a leaf hash, an interior node hash or a tree root.
pub type Hash = [u8; 32];

/// The hash function of the tree, with the RFC 6962 domain separation built in.
///
/// Implementors supply [`digest`](MerkleHasher::digest) (the hash of a concatenation of
/// byte strings, 32 bytes out); the leaf and node hashes are fixed by the RFC:
/// `leaf = H(0x00 ‖ leaf bytes)`, `node = H(0x01 ‖ left ‖ right)`, and the root of the
/// empty tree is `H("")`.
pub trait MerkleHasher {
    /// `H(parts[0] ‖ parts[1] ‖ …)`.
    fn digest(parts: &[&[u8]]) -> Hash;

    /// The root of the empty tree, `H("")`.
    fn empty_root() -> Hash {
        Self::digest(&[])
    }

    /// `H(0x00 ‖ leaf)`.
    fn leaf_hash(leaf: &[u8]) -> Hash {
        Self::digest(&[&[0x00], leaf])
    }

    /// `H(0x01 ‖ left ‖ right)`.
    fn node_hash(left: &Hash, right: &Hash) -> Hash {
        Self::digest(&[&[0x01], left, right])
    }
}

/// BLAKE3 with its default 32-byte output: the production hash of the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Blake3;

impl MerkleHasher for Blake3 {
    fn digest(parts: &[&[u8]]) -> Hash {
        let mut hasher = blake3::Hasher::new();
        for part in parts {
            hasher.update(part);
        }
        *hasher.finalize().as_bytes()
    }

    fn leaf_hash(leaf: &[u8]) -> Hash {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&[0x00]);
        hasher.update(leaf);
        *hasher.finalize().as_bytes()
    }

    fn node_hash(left: &Hash, right: &Hash) -> Hash {
        let mut buf = [0u8; 65];
        buf[0] = 0x01;
        buf[1..33].copy_from_slice(left);
        buf[33..].copy_from_slice(right);
        *blake3::hash(&buf).as_bytes()
    }
}

/// The largest power of two strictly smaller than `n` (`n ≥ 2`): the RFC's split point `k`.
pub(crate) fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// Below this many nodes a level is hashed on the calling thread.
const PARALLEL_LEVEL: usize = 1 << 14;

/// An append-only Merkle tree over leaf hashes, generic over the hash function.
///
/// It stores only hashes (never leaf contents): `32 · (2n − popcount(n))` bytes for `n`
/// leaves, e.g. 640 MB for ten million leaves.
pub struct MerkleTree<H = Blake3> {
    /// `levels[k][i]` = hash of the complete subtree of `2^k` leaves starting at `i·2^k`.
    levels: Vec<Vec<Hash>>,
    _hasher: PhantomData<fn() -> H>,
}

impl<H> Clone for MerkleTree<H> {
    fn clone(&self) -> Self {
        Self {
            levels: self.levels.clone(),
            _hasher: PhantomData,
        }
    }
}

impl<H> std::fmt::Debug for MerkleTree<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerkleTree")
            .field("leaves", &self.levels.first().map_or(0, Vec::len))
            .finish_non_exhaustive()
    }
}

impl<H: MerkleHasher> Default for MerkleTree<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H: MerkleHasher> MerkleTree<H> {
    /// The empty tree.
    pub fn new() -> Self {
        Self {
            levels: vec![Vec::new()],
            _hasher: PhantomData,
        }
    }

    /// Builds the tree from its leaf hashes in one pass per level (parallel for large
    /// levels); every level is allocated at its exact size.
    pub fn from_leaf_hashes(leaf_hashes: Vec<Hash>) -> Self
    where
        H: Send + Sync,
    {
        let mut levels = vec![leaf_hashes];
        loop {
            let below = levels.last().map_or(&[][..], |l| l.as_slice());
            if below.len() < 2 {
                break;
            }
            let mut above = Vec::with_capacity(below.len() / 2);
            if below.len() >= PARALLEL_LEVEL {
                below
                    .par_chunks_exact(2)
                    .map(|pair| H::node_hash(&pair[0], &pair[1]))
                    .collect_into_vec(&mut above);
            } else {
                above.extend(
                    below
                        .chunks_exact(2)
                        .map(|pair| H::node_hash(&pair[0], &pair[1])),
                );
            }
            levels.push(above);
        }
        Self {
            levels,
            _hasher: PhantomData,
        }
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels[0].len() as u64
    }

    /// Whether the tree has no leaves.
    pub fn is_empty(&self) -> bool {
        self.levels[0].is_empty()
    }

    /// Appends a leaf (hashing it as `H(0x00 ‖ leaf)`); returns its index.
    pub fn push_leaf(&mut self, leaf: &[u8]) -> u64 {
        self.push_leaf_hash(H::leaf_hash(leaf))
    }

    /// Appends an already computed leaf hash; returns its index.
    pub fn push_leaf_hash(&mut self, leaf_hash: Hash) -> u64 {
        let index = self.len();
        self.levels[0].push(leaf_hash);
        let mut level = 0;
        while self.levels[level].len().is_multiple_of(2) {
            let nodes = &self.levels[level];
            let parent = H::node_hash(&nodes[nodes.len() - 2], &nodes[nodes.len() - 1]);
            if self.levels.len() == level + 1 {
                self.levels.push(Vec::new());
            }
            self.levels[level + 1].push(parent);
            level += 1;
        }
        index
    }

    /// The leaf hash at `index`, if present.
    pub fn leaf_hash(&self, index: u64) -> Option<Hash> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.levels[0].get(i))
            .copied()
    }

    /// All leaf hashes, in order.
    pub fn leaf_hashes(&self) -> &[Hash] {
        &self.levels[0]
    }

    /// Bytes held by the node arrays (their capacity).
    pub fn memory_bytes(&self) -> usize {
        self.levels
            .iter()
            .map(|l| l.capacity() * std::mem::size_of::<Hash>())
            .sum()
    }

    /// The root of the current tree (`H("")` when empty).
    pub fn root(&self) -> Hash {
        if self.is_empty() {
            H::empty_root()
        } else {
            self.range_hash(0, self.len())
        }
    }

    /// The root the tree had when it had `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash, ProofError> {
        self.check_size(size)?;
        Ok(if size == 0 {
            H::empty_root()
        } else {
            self.range_hash(0, size)
        })
    }

    /// `PATH(index, D[0:size])` of RFC 9162 §2.1.3.1, for any `size` up to the current one.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<InclusionProof, ProofError> {
        self.check_size(size)?;
        if index >= size {
            return Err(ProofError::IndexOutOfRange { index, size });
        }
        // Walk down from the root, collecting the sibling of the side that holds `index`;
        // the RFC lists them leaf first, so reverse at the end.
        let mut path = Vec::new();
        let (mut lo, mut hi) = (0u64, size);
        while hi - lo > 1 {
            let k = split_point(hi - lo);
            if index < lo + k {
                path.push(self.range_hash(lo + k, hi));
                hi = lo + k;
            } else {
                path.push(self.range_hash(lo, lo + k));
                lo += k;
            }
        }
        path.reverse();
        Ok(InclusionProof {
            leaf_index: index,
            tree_size: size,
            path,
        })
    }

    /// `PROOF(old_size, D[0:new_size])` of RFC 9162 §2.1.4.1 (empty when
    /// `old_size == new_size` or `old_size == 0`).
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<ConsistencyProof, ProofError> {
        self.check_size(new_size)?;
        if old_size > new_size {
            return Err(ProofError::OldSizeLarger { old_size, new_size });
        }
        let mut path = Vec::new();
        if old_size > 0 {
            // SUBPROOF(m, D[lo:hi], whole) unrolled: outer elements are found first but
            // listed last.
            let (mut lo, mut hi, mut m, mut whole) = (0u64, new_size, old_size, true);
            loop {
                let n = hi - lo;
                if m == n {
                    if !whole {
                        path.push(self.range_hash(lo, hi));
                    }
                    break;
                }
                let k = split_point(n);
                if m <= k {
                    path.push(self.range_hash(lo + k, hi));
                    hi = lo + k;
                } else {
                    path.push(self.range_hash(lo, lo + k));
                    lo += k;
                    m -= k;
                    whole = false;
                }
            }
            path.reverse();
        }
        Ok(ConsistencyProof {
            old_size,
            new_size,
            path,
        })
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        if size > self.len() {
            Err(ProofError::SizeBeyondTree {
                size,
                tree_size: self.len(),
            })
        } else {
            Ok(())
        }
    }

    /// `MTH(D[lo:hi])` for `lo < hi ≤ len`, from the stored complete subtrees.
    fn range_hash(&self, lo: u64, hi: u64) -> Hash {
        let n = hi - lo;
        if n.is_power_of_two() && lo.is_multiple_of(n) {
            let level = n.trailing_zeros() as usize;
            // In range: the subtree [lo, hi) is complete and aligned, so it was stored
            // when its last leaf was pushed.
            return self.levels[level][(lo >> level) as usize];
        }
        let k = split_point(n);
        H::node_hash(&self.range_hash(lo, lo + k), &self.range_hash(lo + k, hi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_points() {
        assert_eq!(split_point(2), 1);
        assert_eq!(split_point(3), 2);
        assert_eq!(split_point(4), 2);
        assert_eq!(split_point(5), 4);
        assert_eq!(split_point(8), 4);
        assert_eq!(split_point(9), 8);
        assert_eq!(split_point(u64::MAX), 1 << 63);
    }

    #[test]
    fn incremental_equals_bulk() {
        let mut incremental = MerkleTree::<Blake3>::new();
        let mut hashes = Vec::new();
        for i in 0u32..300 {
            let h = Blake3::leaf_hash(&i.to_le_bytes());
            incremental.push_leaf_hash(h);
            hashes.push(h);
            let bulk = MerkleTree::<Blake3>::from_leaf_hashes(hashes.clone());
            assert_eq!(incremental.root(), bulk.root(), "size {}", i + 1);
        }
    }
}
