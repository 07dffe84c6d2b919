//! Public-API tests of pre-kms: threshold behaviour, category isolation, tampering,
//! and golden vectors that pin key derivation, envelopes and grants.

use std::path::PathBuf;

use pre_kms::grant::{self, DepositClaim, GrantPlan};
use pre_kms::reencrypt::{ReleasedEnvelope, decrypt_released, reencrypt_batch};
use pre_kms::{Category, Error, Identity, envelope};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Setup {
    patient: Identity,
    researcher: Identity,
    proxies: Vec<Identity>,
}

fn setup(n: usize, seed: u64) -> Setup {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    Setup {
        patient: Identity::generate_with_rng(&mut rng),
        researcher: Identity::generate_with_rng(&mut rng),
        proxies: (0..n)
            .map(|_| Identity::generate_with_rng(&mut rng))
            .collect(),
    }
}

fn plan(s: &Setup, categories: Vec<Category>, t: usize) -> GrantPlan {
    GrantPlan {
        study_id: "st-test".into(),
        receiving_key: s.researcher.encryption_public_key(),
        categories,
        threshold: t,
        expires_at: 4_000_000_000,
        proxy_keys: s
            .proxies
            .iter()
            .map(|p| p.encryption_public_key())
            .collect(),
    }
}

fn claim(s: &Setup, g: &grant::Grant, category: Category, i: usize) -> DepositClaim {
    DepositClaim {
        grant_id: g.grant_id.clone(),
        study_id: "st-test".into(),
        pseudonym: s.patient.pseudonym(),
        category,
        expires_at: 4_000_000_000,
        proxy_index: i as u32,
        patient_verifying_key: s.patient.verifying_key(),
        delegating_key: s.patient.category_public_key(category),
        receiving_key: s.researcher.encryption_public_key(),
    }
}

/// cfrags from the given proxies for one envelope.
fn cfrags(
    s: &Setup,
    g: &grant::Grant,
    category: Category,
    sealed: &[u8],
    which: &[usize],
) -> Vec<Vec<u8>> {
    let gc = g
        .categories
        .iter()
        .find(|c| c.category == category)
        .unwrap();
    let capsule = envelope::parse(sealed).unwrap().capsule;
    which
        .iter()
        .flat_map(|&i| {
            let k = grant::open_deposit(
                &s.proxies[i],
                &claim(s, g, category, i),
                &gc.sealed_kfrags[i],
            )
            .unwrap();
            reencrypt_batch(&[(capsule.clone(), k.kfrag)])
        })
        .collect()
}

fn released(
    s: &Setup,
    category: Category,
    sealed: Vec<u8>,
    cfrags: Vec<Vec<u8>>,
) -> ReleasedEnvelope {
    ReleasedEnvelope {
        sealed,
        delegating_key: s.patient.category_public_key(category),
        verifying_key: s.patient.verifying_key(),
        cfrags,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Any t of n proxies decrypt; t-1 do not.
    #[test]
    fn t_of_n_decrypts_and_t_minus_one_fails(n in 2usize..=5, seed in any::<u64>(), plaintext in proptest::collection::vec(any::<u8>(), 0..300)) {
        let t = 1 + (seed as usize % n);
        let s = setup(n, seed);
        let sealed = envelope::seal(&s.patient.category_public_key(Category::Conditions), &plaintext).unwrap();
        let g = grant::issue(&s.patient, &plan(&s, vec![Category::Conditions], t)).unwrap();
        // a rotating choice of t proxies
        let which: Vec<usize> = (0..t).map(|k| (seed as usize + k) % n).collect();
        let frags = cfrags(&s, &g, Category::Conditions, &sealed, &which);
        let item = released(&s, Category::Conditions, sealed.clone(), frags.clone());
        prop_assert_eq!(decrypt_released(&s.researcher, &item, t).unwrap(), plaintext.clone());
        if t > 1 {
            let fewer = released(&s, Category::Conditions, sealed, frags[..t - 1].to_vec());
            let is_short = matches!(decrypt_released(&s.researcher, &fewer, t), Err(Error::NotEnoughCfrags { .. }));
            prop_assert!(is_short);
            // Even ignoring the count check, umbral cannot open with t-1 fragments.
            let opened = decrypt_released(&s.researcher, &fewer, t - 1);
            prop_assert!(opened.is_err());
        }
    }
}

#[test]
fn a_grant_for_one_category_cannot_open_another() {
    let s = setup(3, 7);
    let obs = envelope::seal(
        &s.patient.category_public_key(Category::Observations),
        b"observations",
    )
    .unwrap();
    let g = grant::issue(&s.patient, &plan(&s, vec![Category::Conditions], 2)).unwrap();
    // Re-encrypt the observations capsule with the conditions kfrags: what a broker
    // holding the study's kfrags could try.
    let frags = cfrags(&s, &g, Category::Conditions, &obs, &[0, 1]);
    let as_obs = released(&s, Category::Observations, obs.clone(), frags.clone());
    assert!(matches!(
        decrypt_released(&s.researcher, &as_obs, 2),
        Err(Error::CfragRejected(_))
    ));
    let as_cond = ReleasedEnvelope {
        delegating_key: s.patient.category_public_key(Category::Conditions),
        ..as_obs
    };
    assert!(decrypt_released(&s.researcher, &as_cond, 2).is_err());
}

#[test]
fn tampered_cfrags_and_foreign_researchers_are_refused() {
    let s = setup(3, 9);
    let sealed = envelope::seal(
        &s.patient.category_public_key(Category::Conditions),
        b"conditions",
    )
    .unwrap();
    let g = grant::issue(&s.patient, &plan(&s, vec![Category::Conditions], 2)).unwrap();
    let mut frags = cfrags(&s, &g, Category::Conditions, &sealed, &[0, 2]);
    let good = released(&s, Category::Conditions, sealed.clone(), frags.clone());
    assert_eq!(
        decrypt_released(&s.researcher, &good, 2).unwrap(),
        b"conditions"
    );
    // Another researcher cannot use them.
    let other = Identity::generate();
    assert!(decrypt_released(&other, &good, 2).is_err());
    // A flipped byte in a cfrag is caught by verification.
    let last = frags[1].len() - 5;
    frags[1][last] ^= 0x01;
    let bad = released(&s, Category::Conditions, sealed, frags);
    assert!(decrypt_released(&s.researcher, &bad, 2).is_err());
}

#[test]
fn proxies_refuse_kfrags_that_do_not_match_their_claim() {
    let s = setup(3, 11);
    let g = grant::issue(&s.patient, &plan(&s, vec![Category::Conditions], 2)).unwrap();
    let sealed = &g.categories[0].sealed_kfrags[0];
    assert!(
        grant::open_deposit(
            &s.proxies[0],
            &claim(&s, &g, Category::Conditions, 0),
            sealed
        )
        .is_ok()
    );
    // Sealed to proxy 0, offered to proxy 1.
    assert!(
        grant::open_deposit(
            &s.proxies[1],
            &claim(&s, &g, Category::Conditions, 1),
            sealed
        )
        .is_err()
    );
    // The broker lies about the category, the study, the expiry or the receiving key.
    let mut c = claim(&s, &g, Category::Conditions, 0);
    c.category = Category::Observations;
    c.delegating_key = s.patient.category_public_key(Category::Observations);
    assert!(grant::open_deposit(&s.proxies[0], &c, sealed).is_err());
    let mut c = claim(&s, &g, Category::Conditions, 0);
    c.study_id = "st-other".into();
    assert!(grant::open_deposit(&s.proxies[0], &c, sealed).is_err());
    let mut c = claim(&s, &g, Category::Conditions, 0);
    c.expires_at += 1;
    assert!(grant::open_deposit(&s.proxies[0], &c, sealed).is_err());
    let mut c = claim(&s, &g, Category::Conditions, 0);
    c.receiving_key = Identity::generate().encryption_public_key();
    assert!(grant::open_deposit(&s.proxies[0], &c, sealed).is_err());
    // ... or about which grant the kfrag belongs to.
    let mut c = claim(&s, &g, Category::Conditions, 0);
    c.grant_id = format!("gr-{}", "0".repeat(32));
    assert!(grant::open_deposit(&s.proxies[0], &c, sealed).is_err());
    assert!(grant::is_grant_id(&g.grant_id), "{}", g.grant_id);
    let again = grant::issue(&s.patient, &plan(&s, vec![Category::Conditions], 2)).unwrap();
    assert_ne!(again.grant_id, g.grant_id, "every grant has its own id");
    // A grant whose content changed no longer carries the patient's signature.
    assert!(g.verify_signature(&s.patient.verifying_key()).is_ok());
    let mut forged = g.clone();
    forged.expires_at += 1;
    assert!(forged.verify_signature(&s.patient.verifying_key()).is_err());
}

// ------------------------------------------------------------------ golden vectors

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/vectors.json")
}

/// Everything derived from fixed seeds. Umbral's encryption and kfrag generation draw
/// from the injected RNG, so these bytes are stable unless the formats change.
fn compute_vectors() -> serde_json::Value {
    let mut rng = ChaCha20Rng::seed_from_u64(2026);
    let patient = Identity::generate_with_rng(&mut rng);
    let researcher = Identity::generate_with_rng(&mut rng);
    let proxies: Vec<Identity> = (0..3)
        .map(|_| Identity::generate_with_rng(&mut rng))
        .collect();
    let hex_pk = |k: &umbral_pre::PublicKey| hex::encode(k.to_compressed_bytes());
    let categories: serde_json::Map<String, serde_json::Value> = Category::ALL
        .iter()
        .map(|c| {
            (
                c.label().to_owned(),
                hex_pk(&patient.category_public_key(*c)).into(),
            )
        })
        .collect();
    let plaintext = br#"{"resourceType":"Bundle","type":"collection"}"#;
    let sealed = envelope::seal_with_rng(
        &mut rng,
        &patient.category_public_key(Category::Conditions),
        plaintext,
    )
    .unwrap();
    let g = grant::issue_with_rng(
        &mut rng,
        &patient,
        &GrantPlan {
            study_id: "st-golden".into(),
            receiving_key: researcher.encryption_public_key(),
            categories: vec![Category::Conditions, Category::Observations],
            threshold: 2,
            expires_at: 1_900_000_000,
            proxy_keys: proxies.iter().map(|p| p.encryption_public_key()).collect(),
        },
        1_800_000_000_000,
    )
    .unwrap();
    serde_json::json!({
        "seed": 2026,
        "keys": {
            "patient_seed": hex::encode(patient.seed()),
            "verifying_key": hex_pk(&patient.verifying_key()),
            "encryption_key": hex_pk(&patient.encryption_public_key()),
            "actor_id": patient.actor_id(),
            "pseudonym": patient.pseudonym(),
            "category_keys": categories,
            "content_tag_conditions": hex::encode(patient.content_tag(Category::Conditions, plaintext)),
            "index_date_shift": patient.index_date_shift(),
        },
        "envelope": {
            "plaintext": String::from_utf8_lossy(plaintext),
            "bytes": hex::encode(&sealed),
            "blake3": envelope::blob_name(&sealed),
        },
        "grant": {
            "digest": hex::encode(grant::grant_digest(&g)),
            "sealed_kfrag_blake3": g.categories.iter().flat_map(|c| c.sealed_kfrags.iter().map(|k| blake3::hash(k).to_hex().to_string())).collect::<Vec<_>>(),
        },
    })
}

#[test]
fn golden_vectors_match() {
    let computed = compute_vectors();
    let path = golden_path();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&computed).unwrap() + "\n",
        )
        .unwrap();
    }
    let stored: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).expect("golden vectors committed (UPDATE_GOLDEN=1 to write)"),
    )
    .unwrap();
    assert_eq!(
        computed, stored,
        "key derivation, envelope or grant format changed: if intended, regenerate with UPDATE_GOLDEN=1"
    );
    // The stored envelope still opens with the stored seed's key.
    let seed: [u8; 32] = hex::decode(stored["keys"]["patient_seed"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let patient = Identity::from_seed(seed);
    let bytes = hex::decode(stored["envelope"]["bytes"].as_str().unwrap()).unwrap();
    assert_eq!(
        envelope::open_original(&patient.category_key(Category::Conditions), &bytes).unwrap(),
        stored["envelope"]["plaintext"].as_str().unwrap().as_bytes()
    );
}
