//! Break-glass: the emergency organisations patients may hold standing `critical` grants
//! to, and the record of each emergency access.
//!
//! A grant names what it delegates to: a study (`st-…`) or an emergency organisation,
//! written [`emergency_grantee`] (`emergency:ORG`), so that the two can never be
//! confused by a broker, a proxy or a log reader.

use std::fmt;
use std::str::FromStr;

/// The prefix of an emergency organisation's grantee id.
pub const EMERGENCY_GRANTEE_PREFIX: &str = "emergency:";

/// The grantee id a standing break-glass grant to `organisation` names.
pub fn emergency_grantee(organisation: &str) -> String {
    format!("{EMERGENCY_GRANTEE_PREFIX}{organisation}")
}

/// The emergency organisation a grantee id names, if it names one.
pub fn emergency_organisation_of(grantee: &str) -> Option<&str> {
    grantee.strip_prefix(EMERGENCY_GRANTEE_PREFIX)
}

/// Whether `id` can name an emergency organisation: 1–64 lowercase letters, digits and
/// `-`, starting with a letter or digit.
pub fn is_organisation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An organisation whose registered clinicians may break the glass, and the key its
/// standing grants re-encrypt to (its clinicians decrypt with the matching secret key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmergencyOrganisation {
    pub organisation_id: String,
    pub name: String,
    /// Compressed public key (33 bytes).
    pub receiving_key: Vec<u8>,
}

/// What an ethics board found when it reviewed a break-glass access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// A justified emergency access.
    Ok,
    /// Not justified: to be followed up with the clinician's organisation.
    Misuse,
}

impl Finding {
    pub fn as_str(self) -> &'static str {
        match self {
            Finding::Ok => "ok",
            Finding::Misuse => "misuse",
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`Finding`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown finding {0:?}; expected ok or misuse")]
pub struct UnknownFinding(pub String);

impl FromStr for Finding {
    type Err = UnknownFinding;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ok" => Ok(Finding::Ok),
            "misuse" => Ok(Finding::Misuse),
            other => Err(UnknownFinding(crate::quote::excerpt(other))),
        }
    }
}

/// A board member's review of one break-glass access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    pub board_id: String,
    pub finding: Finding,
    pub note: String,
    /// Unix seconds.
    pub reviewed_at: i64,
}

/// One break-glass access, as the broker logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassAccess {
    /// `bg-` and 24 hex digits.
    pub access_id: String,
    pub clinician_id: String,
    pub organisation_id: String,
    pub pseudonym: String,
    pub reason: String,
    /// Whether the clinician presented the patient's signed emergency card.
    pub card_presented: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds: the proxies re-encrypt for this access only before then.
    pub expires_at: i64,
    /// The access's `break_glass` event in the access log.
    pub leaf_index: u64,
    /// The clinician's break-glass accesses in the 24 hours up to this one, this one
    /// included: above the broker's flag threshold the access is flagged for review.
    pub recent_uses: u32,
    pub flagged: bool,
    pub review: Option<Review>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grantee_ids_name_organisations_and_never_studies() {
        assert_eq!(emergency_grantee("er-north"), "emergency:er-north");
        assert_eq!(
            emergency_organisation_of("emergency:er-north"),
            Some("er-north")
        );
        assert_eq!(emergency_organisation_of("st-0123456789abcdef"), None);
        assert!(is_organisation_id("er-north-1"));
        for bad in ["", "-x", "ER", "a b", "a:b", &"a".repeat(65)] {
            assert!(!is_organisation_id(bad), "{bad}");
        }
        assert_eq!("misuse".parse::<Finding>().unwrap(), Finding::Misuse);
        assert!("bad".parse::<Finding>().is_err());
    }
}
