//! Inclusion and consistency proofs and their verification (RFC 9162 §2.1.3.2, §2.1.4.2).
//!
//! Proofs are plain data (sizes and the audit path); the generation side lives on
//! [`MerkleTree`](crate::tree::MerkleTree) and [`AuditLog`](crate::store::AuditLog). In JSON
//! the path is a list of lowercase hex strings.

use serde::{Deserialize, Serialize};

use crate::tree::{Blake3, Hash, MerkleHasher};

/// Why a proof could not be made or did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The leaf index is not below the tree size.
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange {
        /// The leaf index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// A proof was requested for a size the tree has not reached.
    #[error("tree size {size} is beyond the current tree size {tree_size}")]
    SizeBeyondTree {
        /// The requested size.
        size: u64,
        /// The tree's size.
        tree_size: u64,
    },
    /// A consistency proof from a larger tree to a smaller one.
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    OldSizeLarger {
        /// The old size.
        old_size: u64,
        /// The new size.
        new_size: u64,
    },
    /// The path has more elements than the sizes call for.
    #[error("the proof has too many elements for these tree sizes")]
    PathTooLong,
    /// The path has fewer elements than the sizes call for.
    #[error("the proof has too few elements for these tree sizes")]
    PathTooShort,
    /// The path is well formed but the recomputed root differs from the expected one.
    #[error("the root recomputed from the proof differs from the expected root")]
    RootMismatch,
    /// The recomputed old root (consistency proofs) differs from the expected old root.
    #[error("the old root recomputed from the proof differs from the expected old root")]
    OldRootMismatch,
    /// The proof is for other sizes or another index than the ones it is checked against.
    #[error("the proof is for {what} {proof}, but {expected} was expected")]
    WrongParameters {
        /// Which parameter differs.
        what: &'static str,
        /// The value in the proof.
        proof: u64,
        /// The value expected.
        expected: u64,
    },
}

/// An inclusion proof ("audit path") for one leaf in a tree of a given size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InclusionProof {
    /// Index of the leaf.
    pub leaf_index: u64,
    /// Size of the tree the proof is for.
    pub tree_size: u64,
    /// Sibling hashes from the leaf up to the root.
    #[serde(with = "hex_hashes")]
    pub path: Vec<Hash>,
}

impl InclusionProof {
    /// Verifies that `leaf_hash` is leaf `leaf_index` of the tree of `tree_size` leaves with
    /// root `root`, hashing with `H`.
    pub fn verify_with<H: MerkleHasher>(
        &self,
        leaf_hash: &Hash,
        root: &Hash,
    ) -> Result<(), ProofError> {
        verify_inclusion::<H>(leaf_hash, self.leaf_index, self.tree_size, &self.path, root)
    }

    /// [`verify_with`](Self::verify_with) for BLAKE3, given the leaf bytes.
    pub fn verify_leaf(&self, leaf: &[u8], root: &Hash) -> Result<(), ProofError> {
        self.verify_with::<Blake3>(&Blake3::leaf_hash(leaf), root)
    }
}

/// A consistency proof between two sizes of one tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencyProof {
    /// The earlier size.
    pub old_size: u64,
    /// The later size.
    pub new_size: u64,
    /// The proof nodes, in RFC 9162 order.
    #[serde(with = "hex_hashes")]
    pub path: Vec<Hash>,
}

impl ConsistencyProof {
    /// Verifies that the tree of `old_size` leaves with root `old_root` is a prefix of the
    /// tree of `new_size` leaves with root `new_root`, hashing with `H`.
    pub fn verify_with<H: MerkleHasher>(
        &self,
        old_root: &Hash,
        new_root: &Hash,
    ) -> Result<(), ProofError> {
        verify_consistency::<H>(self.old_size, self.new_size, old_root, new_root, &self.path)
    }

    /// [`verify_with`](Self::verify_with) for BLAKE3.
    pub fn verify(&self, old_root: &Hash, new_root: &Hash) -> Result<(), ProofError> {
        self.verify_with::<Blake3>(old_root, new_root)
    }
}

/// RFC 9162 §2.1.3.2: verifies an inclusion proof.
pub fn verify_inclusion<H: MerkleHasher>(
    leaf_hash: &Hash,
    leaf_index: u64,
    tree_size: u64,
    path: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if leaf_index >= tree_size {
        return Err(ProofError::IndexOutOfRange {
            index: leaf_index,
            size: tree_size,
        });
    }
    let (mut f, mut s) = (leaf_index, tree_size - 1);
    let mut r = *leaf_hash;
    for p in path {
        if s == 0 {
            return Err(ProofError::PathTooLong);
        }
        if f & 1 == 1 || f == s {
            r = H::node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = H::node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::PathTooShort);
    }
    if r != *root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// RFC 9162 §2.1.4.2: verifies a consistency proof.
///
/// Edge cases: equal sizes need an empty proof and equal roots; an old size of 0 needs an
/// empty proof and `old_root` = `H("")` (the empty tree is a prefix of every tree).
pub fn verify_consistency<H: MerkleHasher>(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    path: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::OldSizeLarger { old_size, new_size });
    }
    if old_size == new_size || old_size == 0 {
        if !path.is_empty() {
            return Err(ProofError::PathTooLong);
        }
        if old_size == 0 && *old_root != H::empty_root() {
            return Err(ProofError::OldRootMismatch);
        }
        if old_size == new_size && old_root != new_root {
            return Err(ProofError::RootMismatch);
        }
        return Ok(());
    }
    let Some((first, rest)) = path.split_first() else {
        return Err(ProofError::PathTooShort);
    };
    // If the old tree is a complete subtree, its root is the implicit first path element.
    let (seed, rest) = if old_size.is_power_of_two() {
        (old_root, path)
    } else {
        (first, rest)
    };
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*seed, *seed);
    for c in rest {
        if s == 0 {
            return Err(ProofError::PathTooLong);
        }
        if f & 1 == 1 || f == s {
            fr = H::node_hash(c, &fr);
            sr = H::node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = H::node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    if s != 0 {
        return Err(ProofError::PathTooShort);
    }
    if fr != *old_root {
        return Err(ProofError::OldRootMismatch);
    }
    if sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// Serde helpers: a `Vec<[u8; 32]>` as a list of lowercase hex strings.
pub(crate) mod hex_hashes {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::tree::Hash;

    pub fn serialize<S: Serializer>(hashes: &[Hash], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(hashes.iter().map(hex::encode))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash>, D::Error> {
        let strings = Vec::<String>::deserialize(d)?;
        strings
            .iter()
            .map(|s| super::hex_hash::decode(s).map_err(D::Error::custom))
            .collect()
    }
}

/// Serde helpers: a `[u8; 32]` as a lowercase hex string.
pub(crate) mod hex_hash {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::tree::Hash;

    pub fn serialize<S: Serializer>(hash: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(hash))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map_err(D::Error::custom)
    }

    /// Strict: exactly 64 lowercase hex digits.
    pub fn decode(s: &str) -> Result<Hash, String> {
        if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(format!("expected 64 lowercase hex digits, got {s:?}"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|e| format!("bad hex {s:?}: {e}"))?;
        Ok(out)
    }
}
