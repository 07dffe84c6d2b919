//! Record envelopes: one per patient × category × version.
//!
//! The plaintext is the category's research copy as canonical FHIR JSON, compressed
//! with zstd, then sealed to the patient's category key (see [`crate::sealed`] for the
//! framing, magic `PKE1`). A blob is named by the BLAKE3 hash of its bytes.

use rand_core::{CryptoRng, RngCore};
use umbral_pre::{PublicKey, SecretKey};

use crate::error::{Error, Result};
use crate::sealed::Sealed;

pub const MAGIC: &[u8; 4] = b"PKE1";
const ZSTD_LEVEL: i32 = 3;
/// Decompressed research copies larger than this are refused (a zip-bomb guard).
pub const MAX_PLAINTEXT: usize = 256 << 20;

/// Compresses and seals a research copy to a category public key.
pub fn seal_with_rng(
    rng: &mut (impl CryptoRng + RngCore),
    category_key: &PublicKey,
    plaintext: &[u8],
) -> Result<Vec<u8>> {
    let compressed = compress(plaintext)?;
    Ok(Sealed::seal_with_rng(rng, category_key, &compressed)?.to_bytes(MAGIC))
}

thread_local! {
    /// One compression context per thread: making a context costs more than compressing
    /// a small research copy. The output is the same as a fresh context's.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn compress(plaintext: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = match cell.as_mut() {
            Some(c) => c,
            None => cell.insert(zstd::bulk::Compressor::new(ZSTD_LEVEL)?),
        };
        compressor.compress(plaintext)
    })
}

pub fn seal(category_key: &PublicKey, plaintext: &[u8]) -> Result<Vec<u8>> {
    seal_with_rng(&mut rand::rngs::OsRng, category_key, plaintext)
}

pub fn parse(bytes: &[u8]) -> Result<Sealed> {
    Sealed::from_bytes(MAGIC, "envelope", bytes)
}

/// The capsule bytes of an envelope, without parsing them.
pub fn split_capsule(bytes: &[u8]) -> Result<&[u8]> {
    Ok(crate::sealed::split(MAGIC, "envelope", bytes)?.0)
}

/// Opens an envelope with the patient's own category secret key.
pub fn open_original(category_secret: &SecretKey, bytes: &[u8]) -> Result<Vec<u8>> {
    decompress(&parse(bytes)?.open(category_secret)?)
}

pub(crate) fn decompress(compressed: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut decoder = zstd::stream::read::Decoder::new(compressed)
        .map_err(|e| Error::malformed("envelope plaintext", e))?;
    use std::io::Read;
    (&mut decoder)
        .take(MAX_PLAINTEXT as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::malformed("envelope plaintext", e))?;
    if out.len() > MAX_PLAINTEXT {
        return Err(Error::malformed(
            "envelope plaintext",
            "larger than 256 MiB",
        ));
    }
    Ok(out)
}

/// BLAKE3 content address of a blob, in hex.
pub fn blob_name(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Category, Identity};

    #[test]
    fn seal_open_round_trip_and_wrong_key_fails() {
        let patient = Identity::generate();
        let pk = patient.category_public_key(Category::Conditions);
        let plain = br#"{"resourceType":"Bundle","type":"collection"}"#;
        let bytes = seal(&pk, plain).unwrap();
        assert_eq!(&bytes[..4], MAGIC);
        assert_eq!(
            open_original(&patient.category_key(Category::Conditions), &bytes).unwrap(),
            plain
        );
        assert!(open_original(&patient.category_key(Category::Observations), &bytes).is_err());
        // Any flipped ciphertext byte is caught by the AEAD.
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(open_original(&patient.category_key(Category::Conditions), &bad).is_err());
        assert!(parse(&bytes[..6]).is_err());
        assert!(parse(b"XXXX\0\0\0\x01a").is_err());
    }
}
