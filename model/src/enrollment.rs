//! Enrollment: what a patient (or their custodian) registers and signs, its public keys.

use crate::category::Category;

/// A patient's enrollment: the pseudonym, the verifying key, one public key per category,
/// and the patient's signature over [`enrollment_digest`].
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub pseudonym: String,
    pub verifying_key: Vec<u8>,
    pub category_keys: Vec<(Category, Vec<u8>)>,
    pub signature: Vec<u8>,
}

/// What a patient signs to enroll: the pseudonym, the verifying key and every
/// category key, in the order given.
pub fn enrollment_digest(
    pseudonym: &str,
    verifying_key: &[u8],
    category_keys: &[(Category, Vec<u8>)],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("broker enrollment v1");
    h.update(pseudonym.as_bytes());
    h.update(&[0]);
    h.update(verifying_key);
    for (c, k) in category_keys {
        h.update(c.label().as_bytes());
        h.update(&[0]);
        h.update(k);
    }
    *h.finalize().as_bytes()
}
