//! The RFC 6962 / certificate-transparency SHA-256 test vectors, and exhaustive checks of
//! every proof in trees of up to eight leaves against the RFC's recursive definitions.

mod common;
#[path = "common/mutate.rs"]
mod mutate;

use audit_log::proof::{ConsistencyProof, InclusionProof, ProofError, verify_consistency};
use audit_log::tree::{Hash, MerkleHasher, MerkleTree};
use common::{Sha256, h, naive_mth, naive_path, naive_subproof, rfc_leaves};

const ROOTS: [&str; 8] = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
];

const EMPTY_ROOT: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn tree8() -> MerkleTree<Sha256> {
    let mut t = MerkleTree::<Sha256>::new();
    for leaf in rfc_leaves() {
        t.push_leaf(&leaf);
    }
    t
}

#[test]
fn roots_of_sizes_0_to_8() {
    let leaves = rfc_leaves();
    let mut t = MerkleTree::<Sha256>::new();
    assert_eq!(t.root(), h(EMPTY_ROOT));
    assert_eq!(naive_mth::<Sha256>(&[]), h(EMPTY_ROOT));
    for (n, expected) in ROOTS.iter().enumerate() {
        t.push_leaf(&leaves[n]);
        assert_eq!(t.root(), h(expected), "size {}", n + 1);
        assert_eq!(
            naive_mth::<Sha256>(&leaves[..=n]),
            h(expected),
            "naive size {}",
            n + 1
        );
    }
    // Roots of past sizes, from the full tree.
    for (n, expected) in ROOTS.iter().enumerate() {
        assert_eq!(t.root_at(n as u64 + 1).unwrap(), h(expected));
    }
    assert_eq!(t.root_at(0).unwrap(), h(EMPTY_ROOT));
    assert!(matches!(
        t.root_at(9),
        Err(ProofError::SizeBeyondTree {
            size: 9,
            tree_size: 8
        })
    ));
    // Built in one go from leaf hashes.
    let bulk = MerkleTree::<Sha256>::from_leaf_hashes(
        leaves.iter().map(|l| Sha256::leaf_hash(l)).collect(),
    );
    assert_eq!(bulk.root(), h(ROOTS[7]));
}

#[test]
fn literal_paths_from_the_definitions() {
    let leaves = rfc_leaves();
    let t = tree8();
    let lh = |i: usize| Sha256::leaf_hash(&leaves[i]);
    let mth = |a: usize, b: usize| naive_mth::<Sha256>(&leaves[a..b]);

    // Leaf 0 of 8: [leaf 1, MTH(2..4), MTH(4..8)].
    assert_eq!(
        t.inclusion_proof(0, 8).unwrap().path,
        vec![lh(1), mth(2, 4), mth(4, 8)]
    );
    // Leaf 5 of 8: [leaf 4, MTH(6..8), MTH(0..4)].
    assert_eq!(
        t.inclusion_proof(5, 8).unwrap().path,
        vec![lh(4), mth(6, 8), mth(0, 4)]
    );
    // Leaf 6 of 7: its right edge is promoted twice: [MTH(4..6), MTH(0..4)].
    assert_eq!(
        t.inclusion_proof(6, 7).unwrap().path,
        vec![mth(4, 6), mth(0, 4)]
    );
    // Leaf 4 of 5: [MTH(0..4)].
    assert_eq!(t.inclusion_proof(4, 5).unwrap().path, vec![mth(0, 4)]);
    // A single-leaf tree has an empty path.
    assert!(t.inclusion_proof(0, 1).unwrap().path.is_empty());

    // RFC 6962 §2.1.3 examples, on its seven-leaf figure (g = MTH(0..2), i = MTH(4..6),
    // j = leaf 6, k = MTH(0..4), l = MTH(4..7)).
    // PROOF(3, D[7]) = [c, d, g, l].
    assert_eq!(
        t.consistency_proof(3, 7).unwrap().path,
        vec![lh(2), lh(3), mth(0, 2), mth(4, 7)]
    );
    // PROOF(4, D[7]) = [l].
    assert_eq!(t.consistency_proof(4, 7).unwrap().path, vec![mth(4, 7)]);
    // PROOF(6, D[7]) = [i, j, k].
    assert_eq!(
        t.consistency_proof(6, 7).unwrap().path,
        vec![mth(4, 6), lh(6), mth(0, 4)]
    );
}

/// The certificate-transparency / transparency-dev reference proofs for these leaves.
#[test]
fn published_reference_proofs() {
    let leaves = rfc_leaves();
    let t = tree8();
    // (leaf index, tree size, path)
    let inclusion: [(u64, u64, &[&str]); 4] = [
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
    ];
    for (index, size, path) in inclusion {
        let expected: Vec<Hash> = path.iter().map(|s| h(s)).collect();
        let proof = t.inclusion_proof(index, size).unwrap();
        assert_eq!(proof.path, expected, "inclusion {index} in {size}");
        let root = h(ROOTS[size as usize - 1]);
        let leaf_hash = Sha256::leaf_hash(&leaves[index as usize]);
        proof.verify_with::<Sha256>(&leaf_hash, &root).unwrap();
        // The reference suite's probes, all of which must fail.
        let some = h("abacaba000000000000000000000000000000000000000000060061e00123456");
        let probes = [
            (index.wrapping_sub(1), size, root, leaf_hash),
            (index + 1, size, root, leaf_hash),
            (index ^ 2, size, root, leaf_hash),
            (index, size * 2, root, leaf_hash),
            (index, size / 2, root, leaf_hash),
            (index, size, root, Sha256::digest(&[b"WrongLeaf"])),
            (index, size, h(EMPTY_ROOT), leaf_hash),
            (index, size, some, leaf_hash),
        ];
        for (i, s, r, l) in probes {
            let p = InclusionProof {
                leaf_index: i,
                tree_size: s,
                path: expected.clone(),
            };
            assert!(
                p.verify_with::<Sha256>(&l, &r).is_err(),
                "probe index {i} size {s} verified"
            );
        }
    }

    // (old size, new size, path)
    let consistency: [(u64, u64, &[&str]); 5] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];
    for (m, n, path) in consistency {
        let expected: Vec<Hash> = path.iter().map(|s| h(s)).collect();
        let proof = t.consistency_proof(m, n).unwrap();
        assert_eq!(proof.path, expected, "consistency {m} -> {n}");
        let (r1, r2) = (h(ROOTS[m as usize - 1]), h(ROOTS[n as usize - 1]));
        proof.verify_with::<Sha256>(&r1, &r2).unwrap();
        if expected.is_empty() {
            continue;
        }
        let probes = [
            (m - 1, n, r1, r2),
            (m + 1, n, r1, r2),
            (m ^ 2, n, r1, r2),
            (m, n * 2, r1, r2),
            (m, n / 2, r1, r2),
            (m, n, Sha256::digest(&[b"WrongRoot"]), r2),
            (m, n, r1, Sha256::digest(&[b"WrongRoot"])),
            (m, n, r2, r1),
        ];
        for (a, b, x, y) in probes {
            assert!(
                verify_consistency::<Sha256>(a, b, &x, &y, &expected).is_err(),
                "probe {a} -> {b} verified"
            );
        }
        assert!(verify_consistency::<Sha256>(m, n, &r1, &r2, &[]).is_err());
    }
}

#[test]
fn consistency_edge_cases() {
    let empty = h(EMPTY_ROOT);
    let r1 = h(ROOTS[0]);
    let some = h(ROOTS[3]);
    // Equal sizes: empty proof and equal roots.
    verify_consistency::<Sha256>(0, 0, &empty, &empty, &[]).unwrap();
    verify_consistency::<Sha256>(1, 1, &r1, &r1, &[]).unwrap();
    assert!(verify_consistency::<Sha256>(1, 1, &r1, &some, &[]).is_err());
    assert!(verify_consistency::<Sha256>(1, 1, &r1, &r1, &[r1]).is_err());
    // From the empty tree: empty proof, the empty root.
    verify_consistency::<Sha256>(0, 1, &empty, &r1, &[]).unwrap();
    assert!(verify_consistency::<Sha256>(0, 1, &some, &r1, &[]).is_err());
    assert!(verify_consistency::<Sha256>(0, 1, &empty, &r1, &[empty]).is_err());
    // Going back in time.
    assert!(matches!(
        verify_consistency::<Sha256>(2, 1, &r1, &r1, &[]),
        Err(ProofError::OldSizeLarger { .. })
    ));
    // Proof generation refuses the same.
    let t = tree8();
    assert!(t.consistency_proof(5, 4).is_err());
    assert!(t.consistency_proof(5, 9).is_err());
    assert!(t.consistency_proof(0, 8).unwrap().path.is_empty());
    assert!(t.inclusion_proof(8, 8).is_err());
    assert!(t.inclusion_proof(0, 9).is_err());
    assert!(t.inclusion_proof(0, 0).is_err());
}

/// Every inclusion proof (index < size ≤ 8) and consistency proof (1 ≤ m ≤ n ≤ 8) equals
/// the RFC's recursive definition, verifies against the naively computed roots, and fails
/// under every single mutation, and under every other size with that size's genuine root.
#[test]
fn exhaustive_small_trees() {
    let leaves = rfc_leaves();
    let t = tree8();
    let roots: Vec<Hash> = (0..=8).map(|n| naive_mth::<Sha256>(&leaves[..n])).collect();
    let all_bytes: Vec<usize> = (0..32).collect();
    let extra = Sha256::digest(&[b"extra"]);
    let mut checked = 0;
    for n in 1..=8usize {
        for i in 0..n {
            let proof = t.inclusion_proof(i as u64, n as u64).unwrap();
            assert_eq!(
                proof.path,
                naive_path::<Sha256>(i, &leaves[..n]),
                "PATH({i}, {n})"
            );
            let leaf_hash = Sha256::leaf_hash(&leaves[i]);
            proof.verify_with::<Sha256>(&leaf_hash, &roots[n]).unwrap();
            for (what, bad) in mutate::inclusion_mutations(&proof, &all_bytes, &extra) {
                assert!(
                    bad.verify_with::<Sha256>(&leaf_hash, &roots[n]).is_err(),
                    "PATH({i}, {n}) with {what} verified"
                );
                checked += 1;
            }
            // Every other size, with that size's genuine root.
            for (other, other_root) in roots.iter().enumerate().skip(1) {
                if other != n && i < other {
                    let bad = InclusionProof {
                        tree_size: other as u64,
                        ..proof.clone()
                    };
                    assert!(bad.verify_with::<Sha256>(&leaf_hash, other_root).is_err());
                }
            }
            // Wrong leaf, wrong root.
            assert!(proof.verify_with::<Sha256>(&extra, &roots[n]).is_err());
            assert!(proof.verify_with::<Sha256>(&leaf_hash, &extra).is_err());
        }
        for m in 1..=n {
            let proof = t.consistency_proof(m as u64, n as u64).unwrap();
            assert_eq!(
                proof.path,
                naive_subproof::<Sha256>(m, &leaves[..n], true),
                "PROOF({m}, {n})"
            );
            proof.verify_with::<Sha256>(&roots[m], &roots[n]).unwrap();
            for (what, bad) in mutate::consistency_mutations(&proof, &all_bytes, &extra) {
                assert!(
                    bad.verify_with::<Sha256>(&roots[m], &roots[n]).is_err(),
                    "PROOF({m}, {n}) with {what} verified"
                );
                checked += 1;
            }
            for m2 in 0..=8usize {
                for n2 in m2..=8usize {
                    // Skip statements this very path also proves (empty paths prove
                    // every (s, s) and (0, s)).
                    let genuine = t.consistency_proof(m2 as u64, n2 as u64).unwrap();
                    if (m2, n2) != (m, n) && genuine.path != proof.path {
                        let bad = ConsistencyProof {
                            old_size: m2 as u64,
                            new_size: n2 as u64,
                            ..proof.clone()
                        };
                        assert!(
                            bad.verify_with::<Sha256>(&roots[m2], &roots[n2]).is_err(),
                            "PROOF({m}, {n}) verified as ({m2}, {n2})"
                        );
                    }
                }
            }
            if m < n {
                assert!(proof.verify_with::<Sha256>(&roots[n], &roots[m]).is_err());
                assert!(proof.verify_with::<Sha256>(&extra, &roots[n]).is_err());
                assert!(proof.verify_with::<Sha256>(&roots[m], &extra).is_err());
            }
        }
    }
    assert!(checked > 2000, "{checked}");
}
