//! Golden vectors: the canonical bytes and consent version hash of fixed policies.
//! A change to either is a change of what patients sign and what the audit log
//! records, so it must fail here and be made on purpose.

use consent_policy::ConsentPolicy;
use serde_json::Value;

const VECTORS: &str = include_str!("../vectors/canonical.json");

#[test]
fn canonical_bytes_and_hashes_match_the_vectors() {
    let vectors: Vec<Value> = serde_json::from_str(VECTORS).expect("vectors are JSON");
    assert!(vectors.len() >= 5);
    for v in &vectors {
        let name = v["name"].as_str().expect("name");
        let input = serde_json::to_vec_pretty(&v["policy"]).expect("policy");
        let policy = ConsentPolicy::from_json(&input).unwrap_or_else(|e| panic!("{name}: {e}"));
        let canonical = v["canonical"].as_str().expect("canonical");
        assert_eq!(
            std::str::from_utf8(policy.canonical_bytes()).expect("UTF-8"),
            canonical,
            "{name}"
        );
        let hash = v["blake3"].as_str().expect("blake3");
        assert_eq!(policy.policy_hash().to_hex(), hash, "{name}");
        assert_eq!(
            blake3::hash(canonical.as_bytes()).to_hex().as_str(),
            hash,
            "{name}"
        );
    }
}
