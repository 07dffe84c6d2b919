//! Sealed boxes: bytes umbral-encrypted to a public key, framed with a magic tag.
//!
//! ```text
//! magic (4 bytes) | capsule length (u32, big-endian) | capsule | ciphertext
//! ```
//! The capsule is umbral-pre 0.11's standard serialization (`DefaultSerialize`,
//! MessagePack); the ciphertext is exactly what `umbral_pre::encrypt` returned.

use rand_core::{CryptoRng, RngCore};
use umbral_pre::{Capsule, DefaultDeserialize, DefaultSerialize, PublicKey, SecretKey};

use crate::error::{Error, Result};

/// Largest capsule we accept when parsing (a real one is under 200 bytes).
const MAX_CAPSULE_LEN: usize = 4096;

/// A parsed sealed box.
#[derive(Debug, Clone, PartialEq)]
pub struct Sealed {
    pub capsule: Capsule,
    pub ciphertext: Box<[u8]>,
}

impl Sealed {
    pub fn seal_with_rng(
        rng: &mut (impl CryptoRng + RngCore),
        recipient: &PublicKey,
        plaintext: &[u8],
    ) -> Result<Sealed> {
        let (capsule, ciphertext) = umbral_pre::encrypt_with_rng(rng, recipient, plaintext)
            .map_err(|e| Error::Encrypt(e.to_string()))?;
        Ok(Sealed {
            capsule,
            ciphertext,
        })
    }

    /// Opens with the recipient's own secret key.
    pub fn open(&self, secret: &SecretKey) -> Result<Box<[u8]>> {
        umbral_pre::decrypt_original(secret, &self.capsule, &self.ciphertext)
            .map_err(|e| Error::Decrypt(e.to_string()))
    }

    pub fn to_bytes(&self, magic: &[u8; 4]) -> Vec<u8> {
        let capsule = capsule_bytes(&self.capsule);
        let mut out = Vec::with_capacity(8 + capsule.len() + self.ciphertext.len());
        out.extend_from_slice(magic);
        out.extend_from_slice(&(capsule.len() as u32).to_be_bytes());
        out.extend_from_slice(&capsule);
        out.extend_from_slice(&self.ciphertext);
        out
    }

    pub fn from_bytes(magic: &[u8; 4], what: &'static str, bytes: &[u8]) -> Result<Sealed> {
        let (capsule, ciphertext) = split(magic, what, bytes)?;
        Ok(Sealed {
            capsule: parse_capsule(capsule)?,
            ciphertext: ciphertext.into(),
        })
    }
}

/// Splits framed bytes into (capsule bytes, ciphertext) without parsing the capsule.
pub fn split<'a>(
    magic: &[u8; 4],
    what: &'static str,
    bytes: &'a [u8],
) -> Result<(&'a [u8], &'a [u8])> {
    if bytes.len() < 8 || &bytes[..4] != magic {
        return Err(Error::malformed(what, "missing or wrong magic tag"));
    }
    let len = u32::from_be_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_CAPSULE_LEN || bytes.len() < 8 + len {
        return Err(Error::malformed(what, "capsule length out of range"));
    }
    Ok((&bytes[8..8 + len], &bytes[8 + len..]))
}

pub fn capsule_bytes(capsule: &Capsule) -> Vec<u8> {
    capsule
        .to_bytes()
        .expect("capsule serialization cannot fail")
        .to_vec()
}

pub fn parse_capsule(bytes: &[u8]) -> Result<Capsule> {
    Capsule::from_bytes(bytes).map_err(|e| Error::malformed("capsule", e))
}
