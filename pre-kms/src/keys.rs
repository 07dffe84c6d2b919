//! Identities and key files.
//!
//! Every actor (patient, custodian-kept patient, researcher, board member, proxy, the
//! broker itself) is one 32-byte seed. Everything else is derived from it with umbral's
//! `SecretKeyFactory`, under fixed labels:
//!
//! | label | key |
//! |---|---|
//! | `signing` | request and grant signatures; the kfrag signer |
//! | `encryption` | the receiving key of a researcher, the sealing key of a proxy |
//! | `category:<label>` | a patient's per-category envelope key |
//! | `SECRET_DERIVATION/content-tag` (via `make_secret`) | the keyed hash of plaintexts |
//!
//! Secret key files are one line, `PREKMS-SECRET-1 <role> <hex seed>`; public key files
//! are `PREKMS-PUBLIC-1 <role> <hex verifying key> <hex encryption key>`. Lines starting
//! with `#` are comments.

use std::fmt;
use std::path::Path;

use rand_core::{CryptoRng, RngCore};
use umbral_pre::{PublicKey, SecretKey, SecretKeyFactory, Signature, Signer};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use model::Category;

const SECRET_PREFIX: &str = "PREKMS-SECRET-1";
const PUBLIC_PREFIX: &str = "PREKMS-PUBLIC-1";

/// Length of an identity seed.
pub const SEED_LEN: usize = 32;

/// A secret identity: the seed all of an actor's keys derive from.
pub struct Identity {
    seed: Zeroizing<[u8; SEED_LEN]>,
    factory: SecretKeyFactory,
    /// Made once: each derivation of a signer or of its public key is a scalar
    /// multiplication, and identities sign and name themselves often.
    signer: Signer,
    verifying_key: PublicKey,
    /// Derived on first use: patients never need it.
    encryption_key: std::sync::OnceLock<PublicKey>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.actor_id())
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity::from_seed(*self.seed)
    }
}

impl Identity {
    /// A fresh identity from the operating system's RNG.
    pub fn generate() -> Self {
        Self::generate_with_rng(&mut rand::rngs::OsRng)
    }

    /// A fresh identity from the given RNG (seeded RNGs make golden vectors).
    pub fn generate_with_rng(rng: &mut (impl CryptoRng + RngCore)) -> Self {
        let mut seed = [0u8; SEED_LEN];
        rng.fill_bytes(&mut seed);
        let id = Self::from_seed(seed);
        zeroize::Zeroize::zeroize(&mut seed);
        id
    }

    pub fn from_seed(seed: [u8; SEED_LEN]) -> Self {
        let seed = Zeroizing::new(seed);
        let factory = SecretKeyFactory::from_secure_randomness(seed.as_slice())
            .expect("SEED_LEN matches umbral's factory seed size");
        let signer = Signer::new(factory.make_key(b"signing"));
        let verifying_key = signer.verifying_key();
        Identity {
            seed,
            factory,
            signer,
            verifying_key,
            encryption_key: Default::default(),
        }
    }

    /// The seed bytes, for writing a key file or a keystore row.
    pub fn seed(&self) -> &[u8; SEED_LEN] {
        &self.seed
    }

    pub fn signer(&self) -> Signer {
        self.signer.clone()
    }

    pub fn verifying_key(&self) -> PublicKey {
        self.verifying_key
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.sign_with_rng(&mut rand::rngs::OsRng, message)
    }

    pub fn sign_with_rng(&self, rng: &mut (impl CryptoRng + RngCore), message: &[u8]) -> Vec<u8> {
        self.signer
            .sign_with_rng(rng, message)
            .to_be_bytes()
            .to_vec()
    }

    /// The key records are re-encrypted to (researcher) or kfrags are sealed to (proxy).
    pub fn encryption_key(&self) -> SecretKey {
        self.factory.make_key(b"encryption")
    }

    pub fn encryption_public_key(&self) -> PublicKey {
        *self
            .encryption_key
            .get_or_init(|| self.encryption_key().public_key())
    }

    /// The secret key of one record category (a patient's delegating key).
    pub fn category_key(&self, category: Category) -> SecretKey {
        self.factory
            .make_key(format!("category:{}", category.label()).as_bytes())
    }

    pub fn category_public_key(&self, category: Category) -> PublicKey {
        self.category_key(category).public_key()
    }

    /// Keyed BLAKE3 of a category plaintext: equal plaintexts give equal tags for this
    /// patient only, so the broker can recognise a re-upload without learning content.
    pub fn content_tag(&self, category: Category, plaintext: &[u8]) -> [u8; 32] {
        let secret = self.factory.make_secret(b"content-tag");
        let mut key = [0u8; 32];
        key.copy_from_slice(&secret.as_secret()[..32]);
        let mut hasher = blake3::Hasher::new_keyed(&key);
        zeroize::Zeroize::zeroize(&mut key);
        hasher.update(category.label().as_bytes());
        hasher.update(&[0]);
        hasher.update(plaintext);
        *hasher.finalize().as_bytes()
    }

    /// The patient's secret index date shift: 1 to [`model::DATE_SHIFT_MAX_DAYS`] days,
    /// earlier or later, the same for every upload of this identity. The custodian moves
    /// every date of the patient's searchable index by it ([`model::PatientIndex::shifted`]),
    /// so that the broker holds no event on the patient's birth or death date as such.
    /// Derived from the seed, it is destroyed with it.
    pub fn index_date_shift(&self) -> i32 {
        let secret = self.factory.make_secret(b"index-date-shift");
        let mut word = [0u8; 8];
        word.copy_from_slice(&secret.as_secret()[..8]);
        let draw = u64::from_le_bytes(word);
        let max = model::DATE_SHIFT_MAX_DAYS as u64;
        let days = (draw % max) as i32 + 1;
        if (draw / max).is_multiple_of(2) {
            days
        } else {
            -days
        }
    }

    /// The actor id other parties know this identity by.
    pub fn actor_id(&self) -> String {
        actor_id(&self.verifying_key())
    }

    /// The broker pseudonym of a patient identity.
    pub fn pseudonym(&self) -> String {
        pseudonym(&self.verifying_key())
    }

    pub fn public(&self, role: &str) -> PublicIdentity {
        PublicIdentity {
            role: role.to_owned(),
            verifying_key: self.verifying_key(),
            encryption_key: self.encryption_public_key(),
            key_binding: Some(self.key_binding()),
        }
    }

    /// Proof that this identity's encryption key belongs with its verifying key: the
    /// signing key signs the pair (so nobody can attach another encryption key to this
    /// identity), and the encryption key's own secret signs it too (so this identity
    /// cannot claim someone else's encryption key). See [`verify_key_binding`].
    pub fn key_binding(&self) -> Vec<u8> {
        let digest = key_binding_digest(&self.verifying_key(), &self.encryption_public_key());
        let mut proof = self.sign(&digest);
        proof.extend(
            Signer::new(self.encryption_key())
                .sign(&digest)
                .to_be_bytes()
                .iter(),
        );
        proof
    }

    /// Writes `PREKMS-SECRET-1 <role> <hex seed>` with owner-only permissions.
    pub fn write_key_file(&self, path: &Path, role: &str) -> Result<()> {
        check_role_word(role)?;
        let body = Zeroizing::new(format!(
            "# pre-kms secret key: keep it private. actor {}\n{SECRET_PREFIX} {role} {}\n",
            self.actor_id(),
            hex::encode(self.seed.as_slice())
        ));
        write_private(path, body.as_bytes())
    }

    /// Reads a secret key file; returns the identity and its role.
    pub fn read_key_file(path: &Path) -> Result<(Identity, String)> {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| Error::KeyFile(format!("cannot read {}: {e}", path.display())))?,
        );
        Self::parse_key_file(&text).map_err(|e| Error::KeyFile(format!("{}: {e}", path.display())))
    }

    fn parse_key_file(text: &str) -> std::result::Result<(Identity, String), String> {
        let line = significant_line(text)?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some(SECRET_PREFIX) => {}
            Some(PUBLIC_PREFIX) => {
                return Err("this is a public key file; a secret key file is needed".into());
            }
            _ => {
                return Err(format!(
                    "not a pre-kms secret key file (expected {SECRET_PREFIX})"
                ));
            }
        }
        let role = words.next().ok_or("missing role")?.to_owned();
        let seed_hex = Zeroizing::new(words.next().ok_or("missing seed")?.to_owned());
        if words.next().is_some() {
            return Err("unexpected text after the seed".into());
        }
        let mut seed = Zeroizing::new([0u8; SEED_LEN]);
        hex::decode_to_slice(seed_hex.as_bytes(), seed.as_mut_slice())
            .map_err(|_| format!("the seed must be {} hex digits", SEED_LEN * 2))?;
        Ok((Identity::from_seed(*seed), role))
    }
}

/// The public half of an identity, as shared with the operator and other parties.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicIdentity {
    pub role: String,
    pub verifying_key: PublicKey,
    pub encryption_key: PublicKey,
    /// [`Identity::key_binding`], checked when read; files written before it existed
    /// have none.
    pub key_binding: Option<Vec<u8>>,
}

impl PublicIdentity {
    pub fn actor_id(&self) -> String {
        actor_id(&self.verifying_key)
    }

    pub fn to_line(&self) -> String {
        let binding = self
            .key_binding
            .as_ref()
            .map(|b| format!(" {}", hex::encode(b)))
            .unwrap_or_default();
        format!(
            "{PUBLIC_PREFIX} {} {} {}{binding}\n",
            self.role,
            hex::encode(self.verifying_key.to_compressed_bytes()),
            hex::encode(self.encryption_key.to_compressed_bytes())
        )
    }

    pub fn write_file(&self, path: &Path) -> Result<()> {
        check_role_word(&self.role)?;
        std::fs::write(path, self.to_line())
            .map_err(|e| Error::KeyFile(format!("cannot write {}: {e}", path.display())))
    }

    pub fn read_file(path: &Path) -> Result<PublicIdentity> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::KeyFile(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::KeyFile(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> std::result::Result<PublicIdentity, String> {
        let line = significant_line(text)?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some(PUBLIC_PREFIX) => {}
            Some(SECRET_PREFIX) => {
                return Err("this is a secret key file; share the .pub file instead".into());
            }
            _ => {
                return Err(format!(
                    "not a pre-kms public key file (expected {PUBLIC_PREFIX})"
                ));
            }
        }
        let role = words.next().ok_or("missing role")?.to_owned();
        let verifying_key = words
            .next()
            .ok_or("missing verifying key")
            .and_then(|h| public_key_from_hex(h).map_err(|_| "bad verifying key"))?;
        let encryption_key = words
            .next()
            .ok_or("missing encryption key")
            .and_then(|h| public_key_from_hex(h).map_err(|_| "bad encryption key"))?;
        let key_binding = match words.next() {
            None => None,
            Some(h) => {
                let proof = hex::decode(h).map_err(|_| "bad key binding")?;
                if !verify_key_binding(&verifying_key, &encryption_key, &proof) {
                    return Err(
                        "the key binding does not verify: the keys do not belong together".into(),
                    );
                }
                Some(proof)
            }
        };
        if words.next().is_some() {
            return Err("unexpected words after the key binding".into());
        }
        Ok(PublicIdentity {
            role,
            verifying_key,
            encryption_key,
            key_binding,
        })
    }
}

fn significant_line(text: &str) -> std::result::Result<&str, String> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = lines.next().ok_or("the file is empty")?;
    if lines.next().is_some() {
        return Err("more than one key line".into());
    }
    Ok(line)
}

fn check_role_word(role: &str) -> Result<()> {
    if role.is_empty()
        || !role
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::KeyFile(format!("role {role:?} must be one word")));
    }
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        Error::KeyFile(format!(
            "cannot create {} (it must not exist yet): {e}",
            path.display()
        ))
    })?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// Actor id: the first 16 bytes of BLAKE3 over the compressed verifying key, in hex.
pub fn actor_id(verifying_key: &PublicKey) -> String {
    let hash = blake3::derive_key("pre-kms actor id v1", &verifying_key.to_compressed_bytes());
    hex::encode(&hash[..16])
}

/// Broker pseudonym of a patient: like the actor id, under its own domain.
pub fn pseudonym(verifying_key: &PublicKey) -> String {
    let hash = blake3::derive_key(
        "pre-kms patient pseudonym v1",
        &verifying_key.to_compressed_bytes(),
    );
    hex::encode(&hash[..16])
}

pub fn public_key_from_bytes(bytes: &[u8]) -> Result<PublicKey> {
    PublicKey::try_from_compressed_bytes(bytes).map_err(|_| {
        Error::malformed(
            "public key",
            format!("expected 33 compressed bytes, got {}", bytes.len()),
        )
    })
}

pub fn public_key_from_hex(text: &str) -> Result<PublicKey> {
    let bytes = hex::decode(text).map_err(|_| Error::malformed("public key", "not hex"))?;
    public_key_from_bytes(&bytes)
}

pub fn public_key_bytes(key: &PublicKey) -> Vec<u8> {
    key.to_compressed_bytes().to_vec()
}

/// Verifies a 64-byte big-endian ECDSA signature made by [`Identity::sign`].
pub fn verify_signature(key: &PublicKey, message: &[u8], signature: &[u8]) -> bool {
    Signature::try_from_be_bytes(signature).is_ok_and(|s| s.verify(key, message))
}

/// Why an actor's keys cannot receive records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyBindingError {
    #[error("{0} is not a researcher")]
    NotAResearcher(String),
    #[error("researcher {0} registered no encryption key with a valid key binding")]
    Unbound(String),
    #[error(
        "the receiving key is not researcher {0}'s own registered key: records can be re-encrypted only to the named researcher"
    )]
    NotTheResearchers(String),
}

/// Checks that an actor registered its encryption key with a valid binding to its
/// verifying key (and that its id is that key's).
pub fn check_actor_keys(actor: &model::Actor) -> std::result::Result<(), KeyBindingError> {
    let unbound = || KeyBindingError::Unbound(actor.actor_id.clone());
    let vk = public_key_from_bytes(&actor.verifying_key).map_err(|_| unbound())?;
    let ek = public_key_from_bytes(&actor.encryption_key).map_err(|_| unbound())?;
    if actor_id(&vk) != actor.actor_id || !verify_key_binding(&vk, &ek, &actor.key_binding) {
        return Err(unbound());
    }
    Ok(())
}

/// Checks that `receiving_key` is the registered, bound encryption key of `researcher`,
/// a researcher: what the broker checks when a study is proposed and the board's client
/// checks again before it signs an approval.
pub fn check_receiving_key(
    researcher: &model::Actor,
    receiving_key: &[u8],
) -> std::result::Result<(), KeyBindingError> {
    if researcher.role != model::Role::Researcher {
        return Err(KeyBindingError::NotAResearcher(researcher.actor_id.clone()));
    }
    check_actor_keys(researcher)?;
    if researcher.encryption_key != receiving_key {
        return Err(KeyBindingError::NotTheResearchers(
            researcher.actor_id.clone(),
        ));
    }
    Ok(())
}

fn key_binding_digest(verifying_key: &PublicKey, encryption_key: &PublicKey) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("pre-kms key binding v1");
    h.update(&verifying_key.to_compressed_bytes());
    h.update(&encryption_key.to_compressed_bytes());
    *h.finalize().as_bytes()
}

/// Whether `proof` ([`Identity::key_binding`]) binds `encryption_key` to the identity
/// of `verifying_key`: signed by both keys' secrets.
pub fn verify_key_binding(
    verifying_key: &PublicKey,
    encryption_key: &PublicKey,
    proof: &[u8],
) -> bool {
    if !proof.len().is_multiple_of(2) {
        return false;
    }
    let (by_signer, by_encryption_key) = proof.split_at(proof.len() / 2);
    let digest = key_binding_digest(verifying_key, encryption_key);
    verify_signature(verifying_key, &digest, by_signer)
        && verify_signature(encryption_key, &digest, by_encryption_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_key_binding_ties_one_encryption_key_to_one_identity() {
        let researcher = Identity::generate();
        let sponsor = Identity::generate();
        let (vk, ek) = (
            researcher.verifying_key(),
            researcher.encryption_public_key(),
        );
        let proof = researcher.key_binding();
        assert!(verify_key_binding(&vk, &ek, &proof));
        // The sponsor's encryption key under the researcher's identity: neither the
        // researcher's proof nor one the sponsor makes verifies.
        let theirs = sponsor.encryption_public_key();
        assert!(!verify_key_binding(&vk, &theirs, &proof));
        assert!(!verify_key_binding(&vk, &theirs, &sponsor.key_binding()));
        assert!(!verify_key_binding(&vk, &ek, &proof[..proof.len() - 1]));
        // In a public key file, a binding that does not verify is refused.
        let mut forged = researcher.public("researcher");
        forged.encryption_key = theirs;
        let err = PublicIdentity::parse(&forged.to_line()).unwrap_err();
        assert!(err.contains("do not belong together"), "{err}");
    }

    #[test]
    fn key_files_round_trip_and_reject_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::generate_with_rng(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1));
        let path = dir.path().join("r.key");
        id.write_key_file(&path, "researcher").unwrap();
        let (back, role) = Identity::read_key_file(&path).unwrap();
        assert_eq!(role, "researcher");
        assert_eq!(back.verifying_key(), id.verifying_key());
        assert!(
            id.write_key_file(&path, "researcher").is_err(),
            "never overwrites a key"
        );

        let public = id.public("researcher");
        let ppath = dir.path().join("r.pub");
        public.write_file(&ppath).unwrap();
        assert_eq!(PublicIdentity::read_file(&ppath).unwrap(), public);

        for bad in ["", "PREKMS-SECRET-1 x zz", "hello", "PREKMS-SECRET-1 x 00"] {
            let err = Identity::parse_key_file(bad).unwrap_err();
            assert!(!err.is_empty());
        }
        let err = Identity::parse_key_file(&public.to_line()).unwrap_err();
        assert!(err.contains("public key file"), "{err}");
        let seed_hex = hex::encode(id.seed());
        let read = std::fs::read_to_string(&path).unwrap();
        assert!(read.contains(&seed_hex));
        // Debug never shows the seed.
        assert!(!format!("{id:?}").contains(&seed_hex));
    }

    #[test]
    fn signatures_verify_only_for_their_key_and_message() {
        let a = Identity::generate();
        let b = Identity::generate();
        let sig = a.sign(b"msg");
        assert!(verify_signature(&a.verifying_key(), b"msg", &sig));
        assert!(!verify_signature(&a.verifying_key(), b"msh", &sig));
        assert!(!verify_signature(&b.verifying_key(), b"msg", &sig));
        assert!(!verify_signature(&a.verifying_key(), b"msg", &sig[..10]));
    }

    #[test]
    fn index_date_shifts_are_never_zero_and_go_both_ways() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let shifts: Vec<i32> = (0..2_000)
            .map(|_| Identity::generate_with_rng(&mut rng).index_date_shift())
            .collect();
        let max = model::DATE_SHIFT_MAX_DAYS;
        assert!(shifts.iter().all(|d| *d != 0 && d.abs() <= max));
        let earlier = shifts.iter().filter(|d| **d < 0).count();
        assert!((800..1_200).contains(&earlier), "{earlier} of 2000 earlier");
        assert!(shifts.iter().any(|d| d.abs() == 1) || shifts.iter().any(|d| d.abs() < 5));
        assert!(shifts.iter().any(|d| d.abs() > max - 5));
        let id = Identity::generate();
        assert_eq!(id.index_date_shift(), id.index_date_shift());
    }

    #[test]
    fn category_keys_differ() {
        let id = Identity::generate();
        let a = id.category_public_key(Category::Conditions);
        let b = id.category_public_key(Category::Observations);
        assert_ne!(a, b);
        assert_ne!(
            id.content_tag(Category::Conditions, b"x"),
            id.content_tag(Category::Observations, b"x")
        );
    }
}
