//! The patient's emergency card: what a patient carries so that an emergency clinician
//! can name them to the broker without anything identifying on it.
//!
//! A card holds the patient's broker pseudonym, the time it was made and the patient's
//! signature over both (BLAKE3 with the derived key `pre-broker emergency card v1`),
//! written as one line a QR code or a printed card can carry:
//!
//! ```text
//! PBEC1.<pseudonym: 32 hex>.<issued_at: unix seconds>.<signature: hex>
//! ```
//!
//! The broker checks the signature against the patient's enrolled key and logs that a
//! card was presented; a card grants nothing by itself (the patient's consent and
//! standing emergency grants decide), it shows the clinician had the patient's card.

use umbral_pre::PublicKey;

use crate::error::{Error, Result};
use crate::keys::{Identity, verify_signature};

pub const CARD_PREFIX: &str = "PBEC1";

/// A patient's signed emergency card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmergencyCard {
    pub pseudonym: String,
    /// Unix seconds.
    pub issued_at: i64,
    pub signature: Vec<u8>,
}

fn card_digest(pseudonym: &str, issued_at: i64) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("pre-broker emergency card v1");
    h.update(&(pseudonym.len() as u64).to_be_bytes());
    h.update(pseudonym.as_bytes());
    h.update(&issued_at.to_be_bytes());
    *h.finalize().as_bytes()
}

fn bad(reason: &str) -> Error {
    Error::Card(format!(
        "{reason}; an emergency card reads {CARD_PREFIX}.PSEUDONYM.ISSUED.SIGNATURE (`brokerctl patient emergency-card`)"
    ))
}

impl EmergencyCard {
    /// The card of `patient`, made at `issued_at` (unix seconds).
    pub fn sign(patient: &Identity, issued_at: i64) -> EmergencyCard {
        let pseudonym = patient.pseudonym();
        let signature = patient.sign(&card_digest(&pseudonym, issued_at));
        EmergencyCard {
            pseudonym,
            issued_at,
            signature,
        }
    }

    /// The card as one line.
    pub fn to_token(&self) -> String {
        format!(
            "{CARD_PREFIX}.{}.{}.{}",
            self.pseudonym,
            self.issued_at,
            hex::encode(&self.signature)
        )
    }

    /// Reads a card's line (surrounding white space ignored). Errors never quote it.
    pub fn parse(token: &str) -> Result<EmergencyCard> {
        let mut parts = token.trim().split('.');
        let (Some(CARD_PREFIX), Some(pseudonym), Some(issued), Some(sig), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("not an emergency card"));
        };
        let plain_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if pseudonym.len() != 32 || !plain_hex(pseudonym) {
            return Err(bad("the card's pseudonym is not 32 hex digits"));
        }
        let issued_at = issued
            .parse::<i64>()
            .map_err(|_| bad("the card's issue time is not a number"))?;
        let signature = hex::decode(sig)
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .ok_or_else(|| bad("the card's signature is not hex"))?;
        Ok(EmergencyCard {
            pseudonym: pseudonym.to_owned(),
            issued_at,
            signature,
        })
    }

    /// Whether the patient whose verifying key is `key` signed this card.
    pub fn verify(&self, key: &PublicKey) -> Result<()> {
        if crate::keys::pseudonym(key) == self.pseudonym
            && verify_signature(
                key,
                &card_digest(&self.pseudonym, self.issued_at),
                &self.signature,
            )
        {
            Ok(())
        } else {
            Err(Error::BadSignature("emergency card"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_card_round_trips_and_verifies_only_under_its_patients_key() {
        let patient = Identity::generate();
        let card = EmergencyCard::sign(&patient, 1_800_000_000);
        let token = card.to_token();
        assert!(token.starts_with("PBEC1."));
        let read = EmergencyCard::parse(&format!(" {token}\n")).unwrap();
        assert_eq!(read, card);
        read.verify(&patient.verifying_key()).unwrap();
        assert!(read.verify(&Identity::generate().verifying_key()).is_err());
        let mut later = read.clone();
        later.issued_at += 1;
        assert!(later.verify(&patient.verifying_key()).is_err());
        for bad in [
            "",
            "PBEC1",
            "PBEC1.x.1.00",
            &token.replace("PBEC1", "PBEC2"),
            &format!("{token}.1"),
        ] {
            let err = EmergencyCard::parse(bad).unwrap_err().to_string();
            assert!(err.contains("emergency card"), "{err}");
        }
    }
}
