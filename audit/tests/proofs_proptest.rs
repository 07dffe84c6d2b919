//! Random trees (up to a few thousand leaves): every inclusion and consistency proof
//! verifies, and every single mutation of a proof fails.

mod common;
#[path = "common/mutate.rs"]
mod mutate;

use audit_log::proof::{ConsistencyProof, InclusionProof};
use audit_log::tree::{Blake3, Hash, MerkleHasher, MerkleTree};
use common::{Sha256, naive_mth};
use proptest::prelude::*;

fn leaf(seed: u64, i: u64) -> Vec<u8> {
    let mut v = seed.to_le_bytes().to_vec();
    v.extend_from_slice(&i.to_le_bytes());
    v.truncate(8 + (i % 9) as usize);
    v
}

/// Builds the tree and, independently, the root after every append.
fn build<H: MerkleHasher + Send + Sync>(seed: u64, n: u64) -> (MerkleTree<H>, Vec<Hash>) {
    let mut t = MerkleTree::<H>::new();
    let mut roots = vec![t.root()];
    for i in 0..n {
        t.push_leaf(&leaf(seed, i));
        roots.push(t.root());
    }
    (t, roots)
}

fn check_tree<H: MerkleHasher + Send + Sync>(
    seed: u64,
    n: u64,
    picks: &[(u64, u64, usize)],
) -> Result<(), TestCaseError> {
    let (t, roots) = build::<H>(seed, n);
    // The incremental roots agree with the bulk build and with the RFC definition.
    let all: Vec<Vec<u8>> = (0..n).map(|i| leaf(seed, i)).collect();
    prop_assert_eq!(roots[n as usize], naive_mth::<H>(&all));
    let bulk = MerkleTree::<H>::from_leaf_hashes(all.iter().map(|l| H::leaf_hash(l)).collect());
    prop_assert_eq!(bulk.root(), roots[n as usize]);
    for &(a, _, _) in picks {
        let m = a % (n + 1);
        prop_assert_eq!(t.root_at(m).unwrap(), roots[m as usize]);
        prop_assert_eq!(naive_mth::<H>(&all[..m as usize]), roots[m as usize]);
    }

    // Every inclusion proof in the full tree, every consistency proof into it.
    for i in 0..n {
        let proof = t.inclusion_proof(i, n).unwrap();
        prop_assert!(
            proof
                .verify_with::<H>(&H::leaf_hash(&all[i as usize]), &roots[n as usize])
                .is_ok()
        );
    }
    for m in 0..=n {
        let proof = t.consistency_proof(m, n).unwrap();
        prop_assert!(
            proof
                .verify_with::<H>(&roots[m as usize], &roots[n as usize])
                .is_ok()
        );
    }

    // Random (index, size) and (old, new) pairs at earlier sizes, with mutations.
    let extra = H::digest(&[b"extra"]);
    for &(a, b, byte) in picks {
        let size = 1 + b % n;
        let index = a % size;
        let leaf_hash = H::leaf_hash(&all[index as usize]);
        let root = roots[size as usize];
        let proof = t.inclusion_proof(index, size).unwrap();
        prop_assert!(proof.verify_with::<H>(&leaf_hash, &root).is_ok());
        for (what, bad) in mutate::inclusion_mutations(&proof, &[byte % 32, 31 - byte % 32], &extra)
        {
            prop_assert!(
                bad.verify_with::<H>(&leaf_hash, &root).is_err(),
                "inclusion ({}, {}) with {} verified",
                index,
                size,
                what
            );
        }
        for other in [size - 1, size + 1, size * 2, size / 2] {
            if other != size && other > index && other <= n {
                let bad = InclusionProof {
                    tree_size: other,
                    ..proof.clone()
                };
                prop_assert!(
                    bad.verify_with::<H>(&leaf_hash, &roots[other as usize])
                        .is_err()
                );
            }
        }
        prop_assert!(proof.verify_with::<H>(&extra, &root).is_err());
        prop_assert!(proof.verify_with::<H>(&leaf_hash, &extra).is_err());

        let (old, new) = (1 + a.rotate_left(17) % size, size);
        let proof = t.consistency_proof(old, new).unwrap();
        let (r1, r2) = (roots[old as usize], roots[new as usize]);
        prop_assert!(proof.verify_with::<H>(&r1, &r2).is_ok());
        if old == new {
            continue;
        }
        for (what, bad) in
            mutate::consistency_mutations(&proof, &[byte % 32, 31 - byte % 32], &extra)
        {
            prop_assert!(
                bad.verify_with::<H>(&r1, &r2).is_err(),
                "consistency ({}, {}) with {} verified",
                old,
                new,
                what
            );
        }
        for (o2, n2) in [
            (old - 1, new),
            (old + 1, new),
            (old, new - 1),
            (old, new + 1),
            (old ^ 2, new),
            (old, new * 2),
        ] {
            if (o2, n2) != (old, new) && o2 <= n2 && n2 <= n && o2 > 0 {
                let bad = ConsistencyProof {
                    old_size: o2,
                    new_size: n2,
                    ..proof.clone()
                };
                prop_assert!(
                    bad.verify_with::<H>(&roots[o2 as usize], &roots[n2 as usize])
                        .is_err(),
                    "consistency ({}, {}) verified as ({}, {})",
                    old,
                    new,
                    o2,
                    n2
                );
            }
        }
        prop_assert!(proof.verify_with::<H>(&r2, &r1).is_err());
        prop_assert!(proof.verify_with::<H>(&extra, &r2).is_err());
        prop_assert!(proof.verify_with::<H>(&r1, &extra).is_err());
    }
    Ok(())
}

fn sizes() -> impl Strategy<Value = u64> {
    prop_oneof![1u64..70, 70u64..3000]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn blake3_trees(seed in any::<u64>(), n in sizes(),
                    picks in prop::collection::vec((any::<u64>(), any::<u64>(), any::<usize>()), 12)) {
        check_tree::<Blake3>(seed, n, &picks)?;
    }

    #[test]
    fn sha256_trees(seed in any::<u64>(), n in sizes(),
                    picks in prop::collection::vec((any::<u64>(), any::<u64>(), any::<usize>()), 12)) {
        check_tree::<Sha256>(seed, n, &picks)?;
    }
}
