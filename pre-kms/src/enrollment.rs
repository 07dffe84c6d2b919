//! Signing and checking a patient's enrollment ([`model::Enrollment`]): the patient's
//! key signs its pseudonym, verifying key and every category key
//! ([`model::enrollment_digest`]).

use model::{Category, Enrollment, enrollment_digest};
use umbral_pre::PublicKey;

use crate::keys::{Identity, public_key_bytes, public_key_from_bytes, verify_signature};

/// Builds and signs the enrollment of a patient identity, with every category key.
pub fn enroll(patient: &Identity) -> Enrollment {
    let keys: Vec<_> = Category::ALL
        .iter()
        .map(|c| (*c, patient.category_public_key(*c)))
        .collect();
    enroll_with_keys(patient, &keys)
}

/// The same, with the category public keys already derived.
pub fn enroll_with_keys(patient: &Identity, keys: &[(Category, PublicKey)]) -> Enrollment {
    let verifying_key = public_key_bytes(&patient.verifying_key());
    let category_keys: Vec<_> = keys
        .iter()
        .map(|(c, k)| (*c, public_key_bytes(k)))
        .collect();
    let pseudonym = patient.pseudonym();
    let signature = patient.sign(&enrollment_digest(
        &pseudonym,
        &verifying_key,
        &category_keys,
    ));
    Enrollment {
        pseudonym,
        verifying_key,
        category_keys,
        signature,
    }
}

/// Checks that the enrollment is signed by the key it registers.
pub fn check(e: &Enrollment) -> Result<(), &'static str> {
    let vk =
        public_key_from_bytes(&e.verifying_key).map_err(|_| "verifying_key is not a public key")?;
    let digest = enrollment_digest(&e.pseudonym, &e.verifying_key, &e.category_keys);
    if verify_signature(&vk, &digest, &e.signature) {
        Ok(())
    } else {
        Err("the patient's enrollment signature does not verify")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enrollment_verifies_only_unchanged() {
        let patient = Identity::generate();
        let mut e = enroll(&patient);
        assert_eq!(check(&e), Ok(()));
        e.category_keys.swap(0, 1);
        assert!(check(&e).is_err());
    }
}
