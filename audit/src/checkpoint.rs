//! Checkpoints (signed tree heads), their canonical encoding, and pluggable signatures.
//!
//! See the crate documentation for the exact byte formats.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::proof::{ConsistencyProof, InclusionProof, ProofError};
use crate::tree::{Blake3, Hash, MerkleHasher};

/// Prefix of every signed checkpoint message; it keeps checkpoint signatures apart from
/// anything else the same keys sign.
pub const SIGNING_CONTEXT: &[u8] = b"audit-log checkpoint v1\n";

/// The dash that starts a signature line of a note (U+2014 EM DASH, then a space).
const SIGNATURE_LINE_PREFIX: &str = "\u{2014} ";

/// Produces signatures over checkpoint messages (the broker's key, or a witness's).
pub trait CheckpointSigner {
    /// The name under which the signature is recorded and looked up.
    fn key_id(&self) -> String;
    /// Signs `msg` (the [`Checkpoint::signed_message`]).
    fn sign(&self, msg: &[u8]) -> Vec<u8>;
}

/// Checks signatures over checkpoint messages, for any key it knows by id.
pub trait CheckpointVerifier {
    /// Whether `sig` is a valid signature by `key_id` over `msg`. Unknown keys are `false`.
    fn verify(&self, key_id: &str, msg: &[u8], sig: &[u8]) -> bool;
}

/// What is wrong with a checkpoint, its encoding or its signatures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The log id cannot be encoded unambiguously.
    #[error(
        "invalid log id {0:?}: it must be non-empty, at most 255 bytes, without control characters"
    )]
    InvalidLogId(String),
    /// The key id cannot be encoded unambiguously.
    #[error(
        "invalid key id {0:?}: it must be non-empty, at most 255 bytes, without whitespace, control characters or '+'"
    )]
    InvalidKeyId(String),
    /// The text does not follow the format.
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    /// One or more signatures are missing or invalid.
    #[error("checkpoint signature check failed: {}", join_failures(.0))]
    Signatures(Vec<SignatureFailure>),
    /// A key signed the checkpoint twice.
    #[error("key {0:?} already signed this checkpoint")]
    DuplicateSignature(String),
    /// Two checkpoints that should belong to the same log do not.
    #[error("checkpoint is for log {found:?}, expected {expected:?}")]
    WrongLog {
        /// The expected log id.
        expected: String,
        /// The log id found.
        found: String,
    },
    /// A newer checkpoint is older in time or smaller than the previous one.
    #[error(
        "the new checkpoint (size {new_size}, time {new_time}) goes back from the previous one (size {old_size}, time {old_time})"
    )]
    Regression {
        /// Previous size.
        old_size: u64,
        /// Previous time.
        old_time: i64,
        /// New size.
        new_size: u64,
        /// New time.
        new_time: i64,
    },
    /// A proof against the checkpoint failed.
    #[error(transparent)]
    Proof(#[from] ProofError),
}

fn join_failures(failures: &[SignatureFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One required signature that did not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureFailure {
    /// No signature by this key is present.
    #[error("no signature by {0:?}")]
    Missing(String),
    /// The signature by this key does not verify.
    #[error("the signature by {0:?} does not verify")]
    Invalid(String),
    /// The key signed more than once.
    #[error("{0:?} signed more than once")]
    Duplicate(String),
}

/// A tree head: the log's size and root at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The log's identity (the "origin" line).
    pub log_id: String,
    /// Number of leaves.
    pub size: u64,
    /// Root of the first `size` leaves.
    #[serde(with = "crate::proof::hex_hash")]
    pub root: Hash,
    /// Unix seconds at which the log issued the checkpoint.
    pub time: i64,
}

impl Checkpoint {
    /// The canonical body: `<log_id>\n<size>\n<base64 root>\ntime <time>\n`.
    pub fn encode(&self) -> Result<String, CheckpointError> {
        check_log_id(&self.log_id)?;
        Ok(format!(
            "{}\n{}\n{}\ntime {}\n",
            self.log_id,
            self.size,
            BASE64.encode(self.root),
            self.time
        ))
    }

    /// The bytes a signer signs: [`SIGNING_CONTEXT`] followed by [`encode`](Self::encode).
    pub fn signed_message(&self) -> Result<Vec<u8>, CheckpointError> {
        let body = self.encode()?;
        let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
        msg.extend_from_slice(SIGNING_CONTEXT);
        msg.extend_from_slice(body.as_bytes());
        Ok(msg)
    }

    /// Parses a canonical body; anything but the exact canonical form is rejected.
    pub fn decode(body: &str) -> Result<Self, CheckpointError> {
        let malformed = |what: &str| CheckpointError::Malformed(what.to_string());
        let Some(body) = body.strip_suffix('\n') else {
            return Err(malformed("the body does not end with a newline"));
        };
        let lines: Vec<&str> = body.split('\n').collect();
        let [log_id, size, root_line, time] = lines[..] else {
            return Err(malformed("the body must have exactly four lines"));
        };
        check_log_id(log_id)?;
        let size = parse_canonical_u64(size).ok_or_else(|| malformed("bad size line"))?;
        let root_bytes = BASE64
            .decode(root_line)
            .map_err(|e| CheckpointError::Malformed(format!("bad root line: {e}")))?;
        let root: Hash = root_bytes
            .try_into()
            .map_err(|_| malformed("the root is not 32 bytes"))?;
        if BASE64.encode(root) != root_line {
            return Err(malformed("the root is not in canonical base64"));
        }
        let time = time
            .strip_prefix("time ")
            .and_then(parse_canonical_i64)
            .ok_or_else(|| malformed("bad time line"))?;
        Ok(Self {
            log_id: log_id.to_string(),
            size,
            root,
            time,
        })
    }

    /// Checks that `leaf` is in the tree this checkpoint commits to, by `proof` (which must
    /// be for this checkpoint's size).
    pub fn verify_inclusion(&self, leaf: &[u8], proof: &InclusionProof) -> Result<(), ProofError> {
        if proof.tree_size != self.size {
            return Err(ProofError::WrongParameters {
                what: "tree size",
                proof: proof.tree_size,
                expected: self.size,
            });
        }
        proof.verify_with::<Blake3>(&Blake3::leaf_hash(leaf), &self.root)
    }

    /// Checks that `newer` extends this checkpoint, by `proof`: same log, not earlier, not
    /// smaller, and the consistency proof between the two roots holds.
    pub fn verify_consistency(
        &self,
        newer: &Checkpoint,
        proof: &ConsistencyProof,
    ) -> Result<(), CheckpointError> {
        if newer.log_id != self.log_id {
            return Err(CheckpointError::WrongLog {
                expected: self.log_id.clone(),
                found: newer.log_id.clone(),
            });
        }
        if newer.size < self.size || newer.time < self.time {
            return Err(CheckpointError::Regression {
                old_size: self.size,
                old_time: self.time,
                new_size: newer.size,
                new_time: newer.time,
            });
        }
        for (what, got, want) in [
            ("old size", proof.old_size, self.size),
            ("new size", proof.new_size, newer.size),
        ] {
            if got != want {
                return Err(ProofError::WrongParameters {
                    what,
                    proof: got,
                    expected: want,
                }
                .into());
            }
        }
        proof.verify_with::<Blake3>(&self.root, &newer.root)?;
        Ok(())
    }
}

/// One signature on a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSignature {
    /// Who signed.
    pub key_id: String,
    /// The signature bytes (base64 in JSON).
    #[serde(with = "base64_bytes")]
    pub signature: Vec<u8>,
}

/// A checkpoint with the log's signature and any witness co-signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    /// The signed tree head.
    pub checkpoint: Checkpoint,
    /// Signatures over [`Checkpoint::signed_message`], in the order they were added.
    pub signatures: Vec<CheckpointSignature>,
}

impl SignedCheckpoint {
    /// Signs `checkpoint` with `signer` (normally the log's own key).
    pub fn sign(
        checkpoint: Checkpoint,
        signer: &dyn CheckpointSigner,
    ) -> Result<Self, CheckpointError> {
        let mut signed = Self {
            checkpoint,
            signatures: Vec::new(),
        };
        signed.cosign(signer)?;
        Ok(signed)
    }

    /// Adds `signer`'s signature. This checks nothing about the log; a witness should use
    /// [`witness_cosign`] instead.
    pub fn cosign(&mut self, signer: &dyn CheckpointSigner) -> Result<(), CheckpointError> {
        let key_id = signer.key_id();
        check_key_id(&key_id)?;
        if self.signatures.iter().any(|s| s.key_id == key_id) {
            return Err(CheckpointError::DuplicateSignature(key_id));
        }
        let msg = self.checkpoint.signed_message()?;
        let signature = signer.sign(&msg);
        self.signatures
            .push(CheckpointSignature { key_id, signature });
        Ok(())
    }

    /// Checks that every key in `required` has signed exactly once and validly. Signatures
    /// by other keys are ignored. The error lists every failing key.
    pub fn verify(
        &self,
        verifier: &dyn CheckpointVerifier,
        required: &[&str],
    ) -> Result<(), CheckpointError> {
        let msg = self.checkpoint.signed_message()?;
        let mut failures = Vec::new();
        for &key_id in required {
            let mut sigs = self.signatures.iter().filter(|s| s.key_id == key_id);
            match (sigs.next(), sigs.next()) {
                (None, _) => failures.push(SignatureFailure::Missing(key_id.to_string())),
                (Some(_), Some(_)) => {
                    failures.push(SignatureFailure::Duplicate(key_id.to_string()))
                }
                (Some(sig), None) => {
                    if !verifier.verify(key_id, &msg, &sig.signature) {
                        failures.push(SignatureFailure::Invalid(key_id.to_string()));
                    }
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CheckpointError::Signatures(failures))
        }
    }

    /// The signed-note text: the body, an empty line, then one line per signature,
    /// `— <key_id> <base64 signature>`.
    pub fn to_note(&self) -> Result<String, CheckpointError> {
        let mut note = self.checkpoint.encode()?;
        note.push('\n');
        for sig in &self.signatures {
            check_key_id(&sig.key_id)?;
            note.push_str(SIGNATURE_LINE_PREFIX);
            note.push_str(&sig.key_id);
            note.push(' ');
            note.push_str(&BASE64.encode(&sig.signature));
            note.push('\n');
        }
        Ok(note)
    }

    /// Parses [`to_note`](Self::to_note) output (strictly).
    pub fn from_note(note: &str) -> Result<Self, CheckpointError> {
        let Some((body, sigs)) = note.split_once("\n\n") else {
            return Err(CheckpointError::Malformed(
                "no empty line between the body and the signatures".into(),
            ));
        };
        let checkpoint = Checkpoint::decode(&format!("{body}\n"))?;
        let Some(sigs) = sigs.strip_suffix('\n') else {
            return Err(CheckpointError::Malformed(
                "the note does not end with a newline".into(),
            ));
        };
        let mut signatures = Vec::new();
        for line in sigs.split('\n') {
            let rest = line.strip_prefix(SIGNATURE_LINE_PREFIX).ok_or_else(|| {
                CheckpointError::Malformed(format!("not a signature line: {line:?}"))
            })?;
            let (key_id, sig) = rest.split_once(' ').ok_or_else(|| {
                CheckpointError::Malformed(format!("not a signature line: {line:?}"))
            })?;
            check_key_id(key_id)?;
            let signature = BASE64
                .decode(sig)
                .map_err(|e| CheckpointError::Malformed(format!("bad signature base64: {e}")))?;
            if signatures
                .iter()
                .any(|s: &CheckpointSignature| s.key_id == key_id)
            {
                return Err(CheckpointError::DuplicateSignature(key_id.to_string()));
            }
            signatures.push(CheckpointSignature {
                key_id: key_id.to_string(),
                signature,
            });
        }
        Ok(Self {
            checkpoint,
            signatures,
        })
    }
}

/// What a witness (e.g. an ethics board) does before co-signing: check the log's signature
/// on `new`, check that `new` extends the last checkpoint it co-signed (`previous`, with a
/// consistency proof from the log), then add its own signature.
pub fn witness_cosign(
    new: &mut SignedCheckpoint,
    previous: Option<&Checkpoint>,
    proof: Option<&ConsistencyProof>,
    log_verifier: &dyn CheckpointVerifier,
    log_key_id: &str,
    witness: &dyn CheckpointSigner,
) -> Result<(), CheckpointError> {
    new.verify(log_verifier, &[log_key_id])?;
    if let Some(previous) = previous {
        let empty = ConsistencyProof {
            old_size: previous.size,
            new_size: new.checkpoint.size,
            path: Vec::new(),
        };
        previous.verify_consistency(&new.checkpoint, proof.unwrap_or(&empty))?;
    }
    new.cosign(witness)
}

fn check_log_id(log_id: &str) -> Result<(), CheckpointError> {
    if log_id.is_empty() || log_id.len() > 255 || log_id.chars().any(char::is_control) {
        return Err(CheckpointError::InvalidLogId(log_id.to_string()));
    }
    Ok(())
}

fn check_key_id(key_id: &str) -> Result<(), CheckpointError> {
    if key_id.is_empty()
        || key_id.len() > 255
        || key_id
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '+')
    {
        return Err(CheckpointError::InvalidKeyId(key_id.to_string()));
    }
    Ok(())
}

fn parse_canonical_u64(s: &str) -> Option<u64> {
    let v: u64 = s.parse().ok()?;
    (v.to_string() == s).then_some(v)
}

fn parse_canonical_i64(s: &str) -> Option<i64> {
    let v: i64 = s.parse().ok()?;
    (v.to_string() == s).then_some(v)
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&BASE64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        BASE64.decode(s).map_err(D::Error::custom)
    }
}
