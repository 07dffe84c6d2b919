//! What a patient's agent itself last set: the newest consent version it signed for each
//! patient, with its policy hash. The broker serves a patient's consent history, and can
//! forge no version (each is the patient's signature), but it could leave the newest out,
//! so that an older, wider policy decides a grant. The agent checks the history against
//! its own record before it grants ([`crate::agent::consent_history_checked`]).
//!
//! A custodian keeps the record in its keystore; a patient with a key file, in
//! `KEYFILE.consents.json` beside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use consent_policy::ConsentReceipt;
use serde::{Deserialize, Serialize};

use crate::keystore::{Keystore, KeystoreError, Result};

/// The newest version an agent set for a patient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentHead {
    pub version: u32,
    /// Hex, as in the receipt.
    pub policy_hash: String,
}

/// Where an agent keeps its consent heads.
pub trait HeadStore {
    fn head(&self, pseudonym: &str) -> Result<Option<ConsentHead>>;
    /// Records the receipts of versions this agent just set.
    fn record(&self, receipts: &[ConsentReceipt]) -> Result<()>;
    /// Forgets an erased patient: a patient enrolled again starts from nothing.
    fn forget(&self, pseudonym: &str) -> Result<()>;
}

impl HeadStore for Keystore {
    fn head(&self, pseudonym: &str) -> Result<Option<ConsentHead>> {
        self.consent_head(pseudonym)
    }

    fn record(&self, receipts: &[ConsentReceipt]) -> Result<()> {
        self.record_consent_heads(receipts)
    }

    fn forget(&self, pseudonym: &str) -> Result<()> {
        self.forget_patient(pseudonym).map(|_| ())
    }
}

/// The heads of a patient with a key file, in a JSON file beside it.
pub struct HeadFile(PathBuf);

impl HeadFile {
    /// The head file of `key_file`.
    pub fn beside(key_file: &Path) -> HeadFile {
        let mut name = key_file.as_os_str().to_owned();
        name.push(".consents.json");
        HeadFile(PathBuf::from(name))
    }

    fn read(&self) -> Result<BTreeMap<String, ConsentHead>> {
        match std::fs::read(&self.0) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                KeystoreError::Storage(format!("{} is damaged: {e}", self.0.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e.into()),
        }
    }
}

impl HeadStore for HeadFile {
    fn head(&self, pseudonym: &str) -> Result<Option<ConsentHead>> {
        Ok(self.read()?.remove(pseudonym))
    }

    fn record(&self, receipts: &[ConsentReceipt]) -> Result<()> {
        let mut heads = self.read()?;
        for r in receipts {
            heads.insert(
                r.pseudonym.clone(),
                ConsentHead {
                    version: r.version,
                    policy_hash: r.policy_hash.clone(),
                },
            );
        }
        self.write(&heads)
    }

    fn forget(&self, pseudonym: &str) -> Result<()> {
        let mut heads = self.read()?;
        if heads.remove(pseudonym).is_some() {
            self.write(&heads)?;
        }
        Ok(())
    }
}

impl HeadFile {
    fn write(&self, heads: &BTreeMap<String, ConsentHead>) -> Result<()> {
        let json = serde_json::to_vec_pretty(heads).expect("heads serialize");
        // Through a temporary file, so that a crash leaves the old record or the new.
        let tmp = self.0.with_extension("json.tmp");
        pre_kms::private_fs::write_private(&tmp, &json)?;
        std::fs::rename(&tmp, &self.0)?;
        Ok(())
    }
}
