//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;

use audit_log::checkpoint::{CheckpointSigner, CheckpointVerifier};
use audit_log::event::{Actor, ActorRole, AuditEvent, EventKind};
use audit_log::tree::{Hash, MerkleHasher};
use sha2::Digest as _;

/// SHA-256, for the RFC 6962 test vectors.
pub struct Sha256;

impl MerkleHasher for Sha256 {
    fn digest(parts: &[&[u8]]) -> Hash {
        let mut h = sha2::Sha256::new();
        for p in parts {
            h.update(p);
        }
        h.finalize().into()
    }
}

/// TEST ONLY: a keyed-BLAKE3 MAC standing in for a real signature scheme.
pub struct TestMacSigner {
    pub key_id: String,
    pub key: [u8; 32],
}

impl TestMacSigner {
    pub fn new(key_id: &str) -> Self {
        Self {
            key_id: key_id.to_string(),
            key: blake3::derive_key("audit-log tests: mac key", key_id.as_bytes()),
        }
    }
}

impl CheckpointSigner for TestMacSigner {
    fn key_id(&self) -> String {
        self.key_id.clone()
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        blake3::keyed_hash(&self.key, msg).as_bytes().to_vec()
    }
}

/// TEST ONLY: verifies [`TestMacSigner`] MACs for the keys it was given.
#[derive(Default)]
pub struct TestMacVerifier {
    keys: HashMap<String, [u8; 32]>,
}

impl TestMacVerifier {
    pub fn with(signers: &[&TestMacSigner]) -> Self {
        Self {
            keys: signers.iter().map(|s| (s.key_id.clone(), s.key)).collect(),
        }
    }
}

impl CheckpointVerifier for TestMacVerifier {
    fn verify(&self, key_id: &str, msg: &[u8], sig: &[u8]) -> bool {
        self.keys
            .get(key_id)
            .is_some_and(|key| blake3::keyed_hash(key, msg).as_bytes().as_slice() == sig)
    }
}

/// Largest power of two strictly below `n` (n ≥ 2).
pub fn k_of(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// RFC 6962 MTH, straight from the definition.
pub fn naive_mth<H: MerkleHasher>(leaves: &[Vec<u8>]) -> Hash {
    match leaves.len() {
        0 => H::empty_root(),
        1 => H::leaf_hash(&leaves[0]),
        n => {
            let k = k_of(n);
            H::node_hash(&naive_mth::<H>(&leaves[..k]), &naive_mth::<H>(&leaves[k..]))
        }
    }
}

/// RFC 6962 PATH(m, D[n]), straight from the definition.
pub fn naive_path<H: MerkleHasher>(m: usize, leaves: &[Vec<u8>]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = k_of(n);
    if m < k {
        let mut p = naive_path::<H>(m, &leaves[..k]);
        p.push(naive_mth::<H>(&leaves[k..]));
        p
    } else {
        let mut p = naive_path::<H>(m - k, &leaves[k..]);
        p.push(naive_mth::<H>(&leaves[..k]));
        p
    }
}

/// RFC 6962 SUBPROOF(m, D[n], b), straight from the definition.
pub fn naive_subproof<H: MerkleHasher>(m: usize, leaves: &[Vec<u8>], b: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if b {
            Vec::new()
        } else {
            vec![naive_mth::<H>(leaves)]
        };
    }
    let k = k_of(n);
    if m <= k {
        let mut p = naive_subproof::<H>(m, &leaves[..k], b);
        p.push(naive_mth::<H>(&leaves[k..]));
        p
    } else {
        let mut p = naive_subproof::<H>(m - k, &leaves[k..], false);
        p.push(naive_mth::<H>(&leaves[..k]));
        p
    }
}

/// The eight standard leaves of the certificate-transparency test data.
pub fn rfc_leaves() -> Vec<Vec<u8>> {
    [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
    .iter()
    .map(|h| hex::decode(h).unwrap())
    .collect()
}

pub fn h(s: &str) -> Hash {
    hex::decode(s).unwrap().try_into().unwrap()
}

/// A typical event, varied by `i`.
pub fn sample_event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(
        EventKind::Release,
        1_760_000_000 + i as i64,
        Actor {
            id: format!("researcher-{:04}", i % 97),
            role: ActorRole::Registered(model::Role::Researcher),
            organisation: Some("org-university-hospital".into()),
        },
    );
    e.patient = Some(audit_log::PatientTag(blake3::hash(&i.to_le_bytes()).into()));
    e.why.purpose = Some("research".into());
    e.why.study_id = Some(format!("study-{}", i % 13));
    e.why.consent_version = Some(audit_log::event::Digest32(
        blake3::hash(b"consent v3").into(),
    ));
    e.details.release_id = Some(format!("release-{i:08}"));
    e.details.categories = vec!["Observation".into(), "Condition".into()];
    e.details.record_count = Some(12);
    e.details.content_hashes = vec![audit_log::event::Digest32(
        blake3::hash(&(i * 7).to_le_bytes()).into(),
    )];
    e
}
