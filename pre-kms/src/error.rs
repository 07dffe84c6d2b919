//! The one error type of the crate. Messages name what was wrong and never carry key
//! material or record plaintext.

/// Errors from key handling, envelopes, grants, proxies and decryption.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("key file: {0}")]
    KeyFile(String),
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("encryption failed: {0}")]
    Encrypt(String),
    #[error("decryption failed: {0}")]
    Decrypt(String),
    #[error("kfrag rejected: {0}")]
    KfragRejected(String),
    #[error("capsule fragment rejected: {0}")]
    CfragRejected(String),
    #[error("signature does not verify: {0}")]
    BadSignature(&'static str),
    #[error("not enough capsule fragments: have {have}, need {need}")]
    NotEnoughCfrags { have: usize, need: usize },
    #[error("grant: {0}")]
    Grant(String),
    #[error("storage: {0}")]
    Storage(String),
    /// The pinned network manifest is unusable, or the broker's word disagrees with it.
    #[error("network: {0}")]
    Network(String),
    /// An emergency card that does not read as one.
    #[error("{0}")]
    Card(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Self {
        Error::Malformed {
            what,
            reason: reason.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
