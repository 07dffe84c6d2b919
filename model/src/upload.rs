//! An upload: sealed envelopes and index rows, by pseudonym, as a custodian (or a
//! patient) sends them and the broker stores them.

use crate::category::Category;
use crate::index::PatientIndex;

/// One envelope of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedEnvelope {
    pub pseudonym: String,
    pub category: Category,
    /// The sealed envelope (docs/FORMATS.md).
    pub sealed: Vec<u8>,
    /// The patient's keyed hash of the plaintext: an unchanged re-upload stores nothing.
    pub content_tag: Vec<u8>,
}

/// What one upload stores: envelopes and index rows, by pseudonym.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Upload {
    pub envelopes: Vec<UploadedEnvelope>,
    pub index: Vec<(String, PatientIndex)>,
}

/// What became of one uploaded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvelopeReceipt {
    pub pseudonym: String,
    pub category: Category,
    /// The envelope's version (1 for the first, then one more per change).
    pub version: u32,
    /// The BLAKE3 name of the stored blob.
    pub blob: String,
    /// The content tag matched the latest version: nothing new was stored.
    pub unchanged: bool,
}

/// What an upload stored: one receipt per envelope, and how many patients' index rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadReceipt {
    pub receipts: Vec<EnvelopeReceipt>,
    pub index_patients: usize,
}
