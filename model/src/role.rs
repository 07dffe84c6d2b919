//! Actors and their roles.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Patient,
    Custodian,
    Sponsor,
    Researcher,
    Board,
    Clinician,
    Operator,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Patient,
        Role::Custodian,
        Role::Sponsor,
        Role::Researcher,
        Role::Board,
        Role::Clinician,
        Role::Operator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Patient => "patient",
            Role::Custodian => "custodian",
            Role::Sponsor => "sponsor",
            Role::Researcher => "researcher",
            Role::Board => "board",
            Role::Clinician => "clinician",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`Role`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown role {0:?}; expected patient, custodian, sponsor, researcher, board, clinician or operator"
)]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(crate::quote::excerpt(s)))
    }
}

/// A registered actor.
#[derive(Debug, Clone, PartialEq)]
pub struct Actor {
    pub actor_id: String,
    pub role: Role,
    pub name: String,
    pub organisation: String,
    pub verifying_key: Vec<u8>,
    /// The key records are re-encrypted to (a researcher's receiving key); empty when
    /// the actor registered none.
    pub encryption_key: Vec<u8>,
    /// The actor's proof that `encryption_key` is its own (`pre_kms::keys::key_binding`).
    pub key_binding: Vec<u8>,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub actor_id: String,
    pub role: Role,
}
