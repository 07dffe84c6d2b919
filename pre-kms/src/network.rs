//! The network manifest: what a client pins about the network it grants through, so that
//! it obeys no broker that lies about it.
//!
//! A manifest names the broker's key and TLS certificate, the proxies (in the order grants seal kfrags to
//! them) with their keys, the threshold t, and the ethics boards whose signatures approve
//! studies. The operator writes it (`brokerctl operator network`), at least one board
//! member checks and signs it (`brokerctl board sign-network`), and it reaches patients
//! and custodians out of band, like a CA bundle. A patient's agent then:
//!
//! - seals kfrags only to the pinned proxies with the pinned threshold, whatever the
//!   broker lists, and refuses to go on if the broker lists anything else;
//! - grants only to studies whose approval a pinned board signed over the study's
//!   decision digest ([`VerifiedNetwork::check_approval`]), which binds the study id,
//!   purpose, categories, fields, cohort, period, the researcher and the receiving key;
//! - deposits standing break-glass grants of `critical` only to the emergency
//!   organisations the manifest lists, to the receiving key it pins for each.
//!
//! ```text
//! {"format": "pre-broker network v1", "broker_key": HEX, "broker_tls_cert": PEM, "threshold": 2,
//!  "proxies": [{"proxy_id", "verifying_key", "encryption_key"}, ...],
//!  "boards": [{"board_id", "name", "verifying_key"}, ...],
//!  "emergency_organisations": [{"organisation_id", "name", "receiving_key"}, ...],
//!  "signatures": [{"board_id", "signature"}, ...]}
//! ```
//! Signatures cover [`NetworkManifest::digest`]: BLAKE3 (derived key
//! `pre-broker network manifest v1`) of the manifest's JSON without `signatures`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use umbral_pre::PublicKey;

use crate::error::{Error, Result};
use crate::keys::{Identity, actor_id, public_key_bytes, public_key_from_bytes, verify_signature};
use model::{EmergencyOrganisation, Study, StudyStatus, decision_digest};

pub const FORMAT: &str = "pre-broker network v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedProxy {
    pub proxy_id: String,
    /// Compressed public keys, hex.
    pub verifying_key: String,
    pub encryption_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedBoard {
    pub board_id: String,
    pub name: String,
    pub verifying_key: String,
}

/// An emergency organisation whose clinicians may break the glass: patients who allow
/// it deposit standing `critical` grants to its receiving key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedEmergencyOrganisation {
    pub organisation_id: String,
    pub name: String,
    /// Compressed public key, hex.
    pub receiving_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSignature {
    pub board_id: String,
    /// Hex.
    pub signature: String,
}

/// A network manifest as written in its file. [`NetworkManifest::verify`] turns it into
/// a [`VerifiedNetwork`], the only form a client acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkManifest {
    pub format: String,
    pub broker_key: String,
    /// The broker's TLS certificate (PEM), which clients pin; empty for a test network
    /// on plain loopback http.
    #[serde(default)]
    pub broker_tls_cert: String,
    pub threshold: u32,
    pub proxies: Vec<PinnedProxy>,
    pub boards: Vec<PinnedBoard>,
    /// Left out when empty, so manifests without any sign the same bytes as before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emergency_organisations: Vec<PinnedEmergencyOrganisation>,
    #[serde(default)]
    pub signatures: Vec<ManifestSignature>,
}

/// One proxy of a verified network.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkProxy {
    pub proxy_id: String,
    pub verifying_key: PublicKey,
    pub encryption_key: PublicKey,
}

impl NetworkProxy {
    /// The pinned form of a proxy identity (its actor id and public keys).
    pub fn of(proxy: &Identity) -> NetworkProxy {
        NetworkProxy {
            proxy_id: proxy.actor_id(),
            verifying_key: proxy.verifying_key(),
            encryption_key: proxy.encryption_public_key(),
        }
    }
}

/// A manifest whose keys parse and that a board it lists has signed.
#[derive(Debug, Clone)]
pub struct VerifiedNetwork {
    pub broker_key: PublicKey,
    /// The broker's pinned TLS certificate (PEM), if the manifest names one.
    pub broker_tls_cert: Option<String>,
    pub threshold: usize,
    pub proxies: Vec<NetworkProxy>,
    boards: BTreeMap<String, PublicKey>,
    /// The emergency organisations, by id: (name, receiving key).
    pub emergency_organisations: BTreeMap<String, (String, PublicKey)>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Network(reason.into())
}

fn key(hex_key: &str, what: &str) -> Result<PublicKey> {
    hex::decode(hex_key)
        .ok()
        .and_then(|b| public_key_from_bytes(&b).ok())
        .ok_or_else(|| bad(format!("{what} is not a public key")))
}

fn hex_key(key: &PublicKey) -> String {
    hex::encode(public_key_bytes(key))
}

impl NetworkManifest {
    /// A new, unsigned manifest.
    pub fn new(
        broker_key: &PublicKey,
        broker_tls_cert: Option<&str>,
        threshold: usize,
        proxies: &[NetworkProxy],
        boards: &[(String, PublicKey)],
    ) -> NetworkManifest {
        NetworkManifest {
            format: FORMAT.into(),
            broker_key: hex_key(broker_key),
            broker_tls_cert: broker_tls_cert.unwrap_or_default().to_owned(),
            threshold: threshold as u32,
            proxies: proxies
                .iter()
                .map(|p| PinnedProxy {
                    proxy_id: p.proxy_id.clone(),
                    verifying_key: hex_key(&p.verifying_key),
                    encryption_key: hex_key(&p.encryption_key),
                })
                .collect(),
            boards: boards
                .iter()
                .map(|(name, key)| PinnedBoard {
                    board_id: actor_id(key),
                    name: name.clone(),
                    verifying_key: hex_key(key),
                })
                .collect(),
            emergency_organisations: Vec::new(),
            signatures: Vec::new(),
        }
    }

    /// The manifest listing these emergency organisations.
    pub fn with_emergency_organisations(mut self, orgs: &[EmergencyOrganisation]) -> Self {
        self.emergency_organisations = orgs
            .iter()
            .map(|o| PinnedEmergencyOrganisation {
                organisation_id: o.organisation_id.clone(),
                name: o.name.clone(),
                receiving_key: hex::encode(&o.receiving_key),
            })
            .collect();
        self
    }

    /// What board signatures cover: everything but the signatures.
    pub fn digest(&self) -> [u8; 32] {
        let unsigned = NetworkManifest {
            signatures: Vec::new(),
            ..self.clone()
        };
        let json = serde_json::to_vec(&unsigned).expect("a manifest serializes");
        blake3::Hasher::new_derive_key("pre-broker network manifest v1")
            .update(&json)
            .finalize()
            .into()
    }

    /// Adds `board`'s signature; the board must be one the manifest lists.
    pub fn sign(&mut self, board: &Identity) -> Result<()> {
        let board_id = board.actor_id();
        if !self.boards.iter().any(|b| b.board_id == board_id) {
            return Err(bad(format!(
                "board {board_id} is not listed in this manifest, so its signature would not count"
            )));
        }
        let signature = hex::encode(board.sign(&self.digest()));
        self.signatures.retain(|s| s.board_id != board_id);
        self.signatures.push(ManifestSignature {
            board_id,
            signature,
        });
        Ok(())
    }

    /// Checks the manifest: known format, keys that parse, ids that match their keys, a
    /// threshold between 1 and the number of proxies, and at least one signature, every
    /// one by a listed board and valid.
    pub fn verify(&self) -> Result<VerifiedNetwork> {
        if self.format != FORMAT {
            return Err(bad(format!(
                "unknown manifest format {:?} (expected {FORMAT:?})",
                model::quote::excerpt(&self.format)
            )));
        }
        let broker_key = key(&self.broker_key, "broker_key")?;
        let proxies = self
            .proxies
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let verifying_key = key(&p.verifying_key, &format!("proxy {i}'s verifying_key"))?;
                if actor_id(&verifying_key) != p.proxy_id {
                    return Err(bad(format!("proxy {i}'s id does not match its key")));
                }
                Ok(NetworkProxy {
                    proxy_id: p.proxy_id.clone(),
                    verifying_key,
                    encryption_key: key(&p.encryption_key, &format!("proxy {i}'s encryption_key"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let threshold = self.threshold as usize;
        if threshold == 0 || threshold > proxies.len() {
            return Err(bad(format!(
                "threshold {threshold} must be between 1 and the number of proxies ({})",
                proxies.len()
            )));
        }
        let mut boards = BTreeMap::new();
        for (i, b) in self.boards.iter().enumerate() {
            let k = key(&b.verifying_key, &format!("board {i}'s verifying_key"))?;
            if actor_id(&k) != b.board_id {
                return Err(bad(format!("board {i}'s id does not match its key")));
            }
            boards.insert(b.board_id.clone(), k);
        }
        let mut emergency_organisations = BTreeMap::new();
        for (i, o) in self.emergency_organisations.iter().enumerate() {
            if !model::emergency::is_organisation_id(&o.organisation_id) {
                return Err(bad(format!(
                    "emergency organisation {i}'s id is not 1-64 lowercase letters, digits and -"
                )));
            }
            let k = key(
                &o.receiving_key,
                &format!("emergency organisation {i}'s receiving_key"),
            )?;
            if emergency_organisations
                .insert(o.organisation_id.clone(), (o.name.clone(), k))
                .is_some()
            {
                return Err(bad(format!(
                    "emergency organisation {} is listed twice",
                    o.organisation_id
                )));
            }
        }
        if self.signatures.is_empty() {
            return Err(bad(
                "the manifest is not signed: a board member signs it with `brokerctl board sign-network`",
            ));
        }
        for s in &self.signatures {
            let k = boards.get(&s.board_id).ok_or_else(|| {
                bad(format!(
                    "signed by {}, which is not a board the manifest lists",
                    model::quote::excerpt(&s.board_id)
                ))
            })?;
            let signature = hex::decode(&s.signature).unwrap_or_default();
            if !verify_signature(k, &self.digest(), &signature) {
                return Err(bad(format!(
                    "board {}'s signature does not verify: the manifest was changed after it was signed",
                    s.board_id
                )));
            }
        }
        if !self.broker_tls_cert.is_empty()
            && !self.broker_tls_cert.contains("-----BEGIN CERTIFICATE-----")
        {
            return Err(bad("broker_tls_cert is not a PEM certificate"));
        }
        Ok(VerifiedNetwork {
            broker_key,
            broker_tls_cert: Some(self.broker_tls_cert.clone()).filter(|c| !c.is_empty()),
            threshold,
            proxies,
            boards,
            emergency_organisations,
        })
    }

    pub fn read(path: &Path) -> Result<NetworkManifest> {
        let bytes =
            std::fs::read(path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("{} is not a network manifest: {e}", path.display())))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        std::fs::write(path, json).map_err(|e| bad(format!("cannot write {}: {e}", path.display())))
    }
}

impl VerifiedNetwork {
    /// Reads and verifies a manifest file.
    pub fn load(path: &Path) -> Result<VerifiedNetwork> {
        NetworkManifest::read(path)?
            .verify()
            .map_err(|e| bad(format!("{}: {e}", path.display())))
    }

    /// The pinned verifying key of a board, if the network lists it.
    pub fn board_key(&self, board_id: &str) -> Option<&PublicKey> {
        self.boards.get(board_id)
    }

    /// Whether `study` is approved by a board this network pins: its status says
    /// approved, and the board it names signed the approval over the decision digest of
    /// exactly this proposal (researcher and receiving key included).
    pub fn check_approval(&self, study: &Study) -> Result<()> {
        let id = model::quote::excerpt(&study.study_id);
        if study.status != StudyStatus::Approved {
            return Err(bad(format!("study {id} is not approved")));
        }
        let Some(board) = self.boards.get(&study.board_id) else {
            return Err(bad(format!(
                "study {id} was approved by {}, which is not a board this network pins; nothing granted",
                model::quote::excerpt(&study.board_id)
            )));
        };
        let digest = decision_digest(
            &study.study_id,
            &study.proposal,
            true,
            study.overrides_abstain,
        );
        if !verify_signature(board, &digest, &study.board_signature) {
            return Err(bad(format!(
                "study {id}'s approval does not carry a valid signature of board {} over this proposal; nothing granted",
                study.board_id
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> (NetworkManifest, Identity, Vec<Identity>) {
        let board = Identity::generate();
        let proxies: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
        let pinned: Vec<NetworkProxy> = proxies.iter().map(NetworkProxy::of).collect();
        let m = NetworkManifest::new(
            &Identity::generate().verifying_key(),
            None,
            2,
            &pinned,
            &[("IRB".into(), board.verifying_key())],
        );
        (m, board, proxies)
    }

    #[test]
    fn only_a_manifest_signed_by_a_listed_board_and_unchanged_verifies() {
        let (mut m, board, _) = network();
        let err = m.verify().unwrap_err().to_string();
        assert!(err.contains("not signed"), "{err}");
        assert!(m.sign(&Identity::generate()).is_err(), "an unlisted signer");
        m.sign(&board).unwrap();
        let verified = m.verify().unwrap();
        assert_eq!(verified.threshold, 2);
        assert_eq!(verified.proxies.len(), 3);
        // Any change after signing breaks it: a lower threshold, a swapped proxy key.
        let mut lower = m.clone();
        lower.threshold = 1;
        assert!(lower.verify().unwrap_err().to_string().contains("changed"));
        let mut swapped = m.clone();
        swapped.proxies[1].encryption_key = hex_key(&Identity::generate().encryption_public_key());
        assert!(swapped.verify().is_err());
        let json = serde_json::to_vec(&m).unwrap();
        assert!(!String::from_utf8_lossy(&json).contains("emergency"));
        let back: NetworkManifest = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.verify().unwrap().threshold, 2);
    }

    #[test]
    fn emergency_organisations_are_pinned_under_the_boards_signature() {
        let (m, board, _) = network();
        let er = Identity::generate();
        let org = EmergencyOrganisation {
            organisation_id: "er-north".into(),
            name: "North ER".into(),
            receiving_key: public_key_bytes(&er.encryption_public_key()),
        };
        let mut m = m.with_emergency_organisations(std::slice::from_ref(&org));
        m.sign(&board).unwrap();
        let verified = m.verify().unwrap();
        assert_eq!(
            verified.emergency_organisations["er-north"].1,
            er.encryption_public_key()
        );
        // Swapping the key, or adding an organisation, after the board signed is refused.
        let mut swapped = m.clone();
        swapped.emergency_organisations[0].receiving_key =
            hex_key(&Identity::generate().encryption_public_key());
        assert!(
            swapped
                .verify()
                .unwrap_err()
                .to_string()
                .contains("changed")
        );
        let mut added = m.clone();
        added
            .emergency_organisations
            .push(PinnedEmergencyOrganisation {
                organisation_id: "er-south".into(),
                ..added.emergency_organisations[0].clone()
            });
        assert!(added.verify().is_err());
    }
}
