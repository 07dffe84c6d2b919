//! Single mutations of proofs, for "every mutation fails" checks.

use audit_log::proof::{ConsistencyProof, InclusionProof};
use audit_log::tree::Hash;

/// Every way of changing a path by one element: each byte of each element flipped (or only
/// `byte_positions` of them), each element dropped, an element inserted at the front, the
/// back and the middle (a copy of a neighbour, zeros, or `extra`), two neighbours swapped.
pub fn path_mutations(
    path: &[Hash],
    byte_positions: &[usize],
    extra: &Hash,
) -> Vec<(String, Vec<Hash>)> {
    let mut out = Vec::new();
    for i in 0..path.len() {
        for &b in byte_positions {
            let mut p = path.to_vec();
            p[i][b] ^= 0x01;
            out.push((format!("flip byte {b} of element {i}"), p));
        }
        let mut p = path.to_vec();
        p.remove(i);
        out.push((format!("drop element {i}"), p));
        if i + 1 < path.len() && path[i] != path[i + 1] {
            let mut p = path.to_vec();
            p.swap(i, i + 1);
            out.push((format!("swap elements {i} and {}", i + 1), p));
        }
    }
    for (what, h) in [("zeros", [0u8; 32]), ("extra", *extra)] {
        for at in [0, path.len() / 2, path.len()] {
            let mut p = path.to_vec();
            p.insert(at, h);
            out.push((format!("insert {what} at {at}"), p));
        }
    }
    if let Some(first) = path.first() {
        let mut p = path.to_vec();
        p.insert(0, *first);
        out.push(("duplicate first element".into(), p));
    }
    out
}

/// Mutated inclusion proofs: path mutations plus other indices (same leaf hash and root).
pub fn inclusion_mutations(
    proof: &InclusionProof,
    byte_positions: &[usize],
    extra: &Hash,
) -> Vec<(String, InclusionProof)> {
    let mut out: Vec<(String, InclusionProof)> = path_mutations(&proof.path, byte_positions, extra)
        .into_iter()
        .map(|(d, path)| {
            (
                d,
                InclusionProof {
                    path,
                    ..proof.clone()
                },
            )
        })
        .collect();
    let i = proof.leaf_index;
    for other in [i.wrapping_sub(1), i + 1, i ^ 1, i ^ 2, i + proof.tree_size] {
        if other != i && other < proof.tree_size + 1 {
            out.push((
                format!("index {other}"),
                InclusionProof {
                    leaf_index: other,
                    ..proof.clone()
                },
            ));
        }
    }
    out
}

/// Mutated consistency proofs: path mutations only (size changes need other roots).
pub fn consistency_mutations(
    proof: &ConsistencyProof,
    byte_positions: &[usize],
    extra: &Hash,
) -> Vec<(String, ConsistencyProof)> {
    path_mutations(&proof.path, byte_positions, extra)
        .into_iter()
        .map(|(d, path)| {
            (
                d,
                ConsistencyProof {
                    path,
                    ..proof.clone()
                },
            )
        })
        .collect()
}
