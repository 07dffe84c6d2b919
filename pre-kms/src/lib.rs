//! `pre-kms`: the cryptography of the broker, on umbral-pre 0.11.
//!
//! It owns keys and key files ([`keys`]), record envelopes ([`envelope`]), grants
//! ([`grant`]: signed t-of-n kfrag sets sealed to proxies), re-encryption and the
//! researcher's verification and decryption ([`reencrypt`]), what a proxy checks before it
//! re-encrypts ([`logged_release`]) and signed requests ([`request_auth`]). It does no
//! I/O beyond reading and writing key files and making secret files owner-only
//! ([`private_fs`]): the proxy node that stores kfrags is the
//! `pre-kms-proxy` crate, the custodian's keystore lives with the client.
//!
//! ```text
//! patient ──seal(category key)──▶ envelope ──▶ broker (stores, cannot read)
//! patient ──kfrags(category → study), sealed per proxy──▶ broker ──▶ proxies (verify, keep)
//! broker ──capsule──▶ t proxies ──cfrags──▶ broker (verifies) ──▶ researcher (verifies, decrypts)
//! ```
//!
//! ```
//! use pre_kms::{envelope, grant, reencrypt, Category, Identity};
//! let patient = Identity::generate();
//! let researcher = Identity::generate();
//! let proxies: Vec<Identity> = (0..3).map(|_| Identity::generate()).collect();
//!
//! let sealed = envelope::seal(&patient.category_public_key(Category::Conditions), b"{}").unwrap();
//! let plan = grant::GrantPlan {
//!     study_id: "s1".into(),
//!     receiving_key: researcher.encryption_public_key(),
//!     categories: vec![Category::Conditions],
//!     threshold: 2,
//!     expires_at: i64::MAX,
//!     proxy_keys: proxies.iter().map(|p| p.encryption_public_key()).collect(),
//! };
//! let g = grant::issue(&patient, &plan).unwrap();
//! let capsule = envelope::parse(&sealed).unwrap().capsule;
//! let mut cfrags = Vec::new();
//! for (i, proxy) in proxies.iter().enumerate().take(2) {
//!     let claim = grant::DepositClaim {
//!         grant_id: g.grant_id.clone(),
//!         study_id: "s1".into(), pseudonym: patient.pseudonym(), category: Category::Conditions,
//!         expires_at: i64::MAX, proxy_index: i as u32,
//!         patient_verifying_key: patient.verifying_key(),
//!         delegating_key: patient.category_public_key(Category::Conditions),
//!         receiving_key: researcher.encryption_public_key(),
//!     };
//!     let k = grant::open_deposit(proxy, &claim, &g.categories[0].sealed_kfrags[i]).unwrap();
//!     cfrags.extend(reencrypt::reencrypt_batch(&[(capsule.clone(), k.kfrag)]));
//! }
//! let item = reencrypt::ReleasedEnvelope {
//!     sealed, cfrags,
//!     delegating_key: patient.category_public_key(Category::Conditions),
//!     verifying_key: patient.verifying_key(),
//! };
//! assert_eq!(reencrypt::decrypt_released(&researcher, &item, 2).unwrap(), b"{}");
//! ```
pub mod emergency;
pub mod enrollment;
pub mod envelope;
pub mod erasure;
pub mod error;
pub mod grant;
pub mod keys;
pub mod logged_release;
pub mod network;
pub mod private_fs;
pub mod reencrypt;
pub mod request_auth;
pub mod sealed;

pub use error::{Error, Result};
pub use keys::{Identity, PublicIdentity};
pub use model::Category;
