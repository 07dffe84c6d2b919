//! Re-encryption (proxy side), capsule-fragment verification (broker and researcher),
//! and decryption of a released envelope (researcher side).

use rayon::prelude::*;
use umbral_pre::{
    Capsule, CapsuleFrag, DefaultDeserialize, DefaultSerialize, PublicKey, VerifiedCapsuleFrag,
    VerifiedKeyFrag,
};

use crate::envelope;
use crate::error::{Error, Result};
use crate::keys::Identity;

/// Re-encrypts a batch of capsules, each with its kfrag, across the rayon pool.
/// Returns serialized cfrags in input order.
pub fn reencrypt_batch(items: &[(Capsule, VerifiedKeyFrag)]) -> Vec<Vec<u8>> {
    items
        .par_iter()
        .map(|(capsule, kfrag)| reencrypt_one(capsule, kfrag.clone()))
        .collect()
}

/// Re-encrypts one capsule; returns the serialized cfrag.
pub fn reencrypt_one(capsule: &Capsule, kfrag: VerifiedKeyFrag) -> Vec<u8> {
    let cfrag = umbral_pre::reencrypt(capsule, kfrag);
    cfrag
        .to_bytes()
        .expect("cfrag serialization cannot fail")
        .to_vec()
}

/// The public keys a cfrag is checked against.
#[derive(Debug, Clone)]
pub struct CfragContext<'a> {
    pub capsule: &'a Capsule,
    pub patient_verifying_key: &'a PublicKey,
    pub delegating_key: &'a PublicKey,
    pub receiving_key: &'a PublicKey,
}

/// Verifies one serialized cfrag (umbral's proof of correct re-encryption).
pub fn verify_cfrag(ctx: &CfragContext<'_>, bytes: &[u8]) -> Result<VerifiedCapsuleFrag> {
    let cfrag = CapsuleFrag::from_bytes(bytes)
        .map_err(|e| Error::CfragRejected(format!("does not parse: {e}")))?;
    cfrag
        .verify(
            ctx.capsule,
            ctx.patient_verifying_key,
            ctx.delegating_key,
            ctx.receiving_key,
        )
        .map_err(|(e, _)| Error::CfragRejected(e.to_string()))
}

/// A released envelope as the researcher receives it.
#[derive(Debug, Clone)]
pub struct ReleasedEnvelope {
    pub sealed: Vec<u8>,
    pub delegating_key: PublicKey,
    pub verifying_key: PublicKey,
    pub cfrags: Vec<Vec<u8>>,
}

/// Verifies every cfrag, then decrypts and decompresses the research copy.
/// Any cfrag that fails verification fails the whole envelope: a lying proxy or broker
/// is reported, never silently skipped.
pub fn decrypt_released(
    researcher: &Identity,
    item: &ReleasedEnvelope,
    threshold: usize,
) -> Result<Vec<u8>> {
    let sealed = envelope::parse(&item.sealed)?;
    let receiving_key = researcher.encryption_public_key();
    let ctx = CfragContext {
        capsule: &sealed.capsule,
        patient_verifying_key: &item.verifying_key,
        delegating_key: &item.delegating_key,
        receiving_key: &receiving_key,
    };
    let verified = item
        .cfrags
        .iter()
        .map(|c| verify_cfrag(&ctx, c))
        .collect::<Result<Vec<_>>>()?;
    if verified.len() < threshold {
        return Err(Error::NotEnoughCfrags {
            have: verified.len(),
            need: threshold,
        });
    }
    let compressed = umbral_pre::decrypt_reencrypted(
        &researcher.encryption_key(),
        &item.delegating_key,
        &sealed.capsule,
        verified,
        &sealed.ciphertext,
    )
    .map_err(|e| Error::Decrypt(e.to_string()))?;
    envelope::decompress(&compressed)
}
