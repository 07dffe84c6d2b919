//! Protected counts: what a sponsor may see of an exact count, and how often they may ask.
//!
//! ## Counts
//!
//! With the default [`ProtectionPolicy`]:
//!
//! 1. an exact count below 11 is reported as `<11` (the usual small-cell rule, as in
//!    PCORnet's data-sharing agreements);
//! 2. otherwise noise `u1 + u2` is added, each `u` uniform on −3..=3 (a triangular
//!    distribution on −6..=6, most often 0), and the sum is rounded to the nearest multiple
//!    of 5 (halves up); a result below 11 is again reported as `<11`, so no number below 11
//!    is ever shown.
//!
//! The noise is deterministic: it is drawn from keyed BLAKE3 (the broker's secret is the
//! key) over the normalized definition's hash and the consent snapshot's hash. Asking the
//! same question again, or an equivalent one written in another order, gives the same
//! answer, so repetition cannot average the noise away; without the secret a sponsor
//! cannot compute the noise. When consents change, the snapshot hash changes and the noise
//! is drawn afresh. Each attrition step is protected the same way, seeded by the
//! normalized definition of the criteria up to that step, so a step's protected count is
//! the protected count of the equivalent shorter definition.
//!
//! Prior art: SHRINE adds Gaussian noise (σ 1.33, clamped to ±3) to counts above 10 and
//! stores the noise per result, so a re-run of the same query draws new noise; Leaf reports
//! counts at or below a threshold as under it and shifts the rest by a uniform amount
//! seeded by an MD5 of the query's sorted concept ids (reordering-invariant, but unkeyed:
//! anyone with the code and the query can compute the shift). Here the seed is
//! reordering-invariant *and* keyed.
//!
//! ## Budgets
//!
//! [`QueryBudget`] holds one sponsor's allowance: at most `per_minute` counts in any
//! sliding minute and `total` counts overall. The broker persists it (it serializes) and
//! charges it before running a count.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::consent::ConsentHash;
use crate::definition::{CohortDefinition, DefinitionHash};
use crate::engine::CountResult;

/// The broker's secret key for count noise. Never printed.
#[derive(Clone)]
pub struct BrokerSecret(Zeroizing<[u8; 32]>);

impl BrokerSecret {
    /// A secret from 32 random bytes (generate them with a CSPRNG; store them sealed).
    pub fn from_bytes(bytes: [u8; 32]) -> BrokerSecret {
        BrokerSecret(Zeroizing::new(bytes))
    }
}

impl fmt::Debug for BrokerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerSecret(..)")
    }
}

/// How counts are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectionPolicy {
    /// Counts below this are reported as `<threshold`.
    pub threshold: u64,
    /// Reported counts are multiples of this.
    pub round_to: u64,
    /// Noise is `u1 + u2`, each uniform on `-noise..=noise`.
    pub noise: u32,
}

impl Default for ProtectionPolicy {
    fn default() -> Self {
        ProtectionPolicy {
            threshold: 11,
            round_to: 5,
            noise: 3,
        }
    }
}

/// A count as a sponsor may see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtectedCount {
    /// Fewer than `threshold` (shown as `<11`).
    Below(u64),
    /// About this many: noisy and rounded.
    About(u64),
}

impl fmt::Display for ProtectedCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtectedCount::Below(t) => write!(f, "<{t}"),
            ProtectedCount::About(n) => write!(f, "{n}"),
        }
    }
}

/// One protected attrition step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedStep {
    pub step: usize,
    pub label: String,
    pub count: ProtectedCount,
}

/// A count result as a sponsor may see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedResult {
    pub count: ProtectedCount,
    pub attrition: Vec<ProtectedStep>,
}

/// The protected form of one exact count, seeded by a definition hash and a consent hash.
pub fn protect_count(
    exact: u64,
    definition: &DefinitionHash,
    consent: &ConsentHash,
    secret: &BrokerSecret,
    policy: &ProtectionPolicy,
) -> ProtectedCount {
    let threshold = policy.threshold;
    if exact < threshold {
        return ProtectedCount::Below(threshold);
    }
    let noise = noise(definition, consent, secret, policy.noise);
    let noisy = (exact as i128 + i128::from(noise)).max(0) as u128;
    let step = u128::from(policy.round_to.max(1));
    let rounded = (noisy + step / 2) / step * step;
    let rounded = u64::try_from(rounded).unwrap_or(u64::MAX);
    if rounded < threshold {
        ProtectedCount::Below(threshold)
    } else {
        ProtectedCount::About(rounded)
    }
}

/// The protected form of a count result: the final count and every attrition step.
pub fn protect(
    result: &CountResult,
    definition: &CohortDefinition,
    consent: &ConsentHash,
    secret: &BrokerSecret,
    policy: &ProtectionPolicy,
) -> ProtectedResult {
    let attrition: Vec<ProtectedStep> = result
        .attrition
        .iter()
        .map(|s| ProtectedStep {
            step: s.step,
            label: s.label.clone(),
            count: protect_count(
                s.exact,
                &definition.prefix(s.step).normalized().hash,
                consent,
                secret,
                policy,
            ),
        })
        .collect();
    let count = protect_count(
        result.exact,
        &definition.normalized().hash,
        consent,
        secret,
        policy,
    );
    ProtectedResult { count, attrition }
}

/// `u1 + u2`, each uniform on `-spread..=spread`, from keyed BLAKE3.
fn noise(
    definition: &DefinitionHash,
    consent: &ConsentHash,
    secret: &BrokerSecret,
    spread: u32,
) -> i64 {
    let mut hasher = blake3::Hasher::new_keyed(&secret.0);
    hasher.update(b"cohort-query count noise v1\0");
    hasher.update(&definition.0);
    hasher.update(&consent.0);
    let mut xof = hasher.finalize_xof();
    let width = 2 * u64::from(spread) + 1;
    // Rejection sampling keeps each draw exactly uniform.
    let limit = u64::MAX - u64::MAX % width;
    let mut draw = || loop {
        let mut b = [0u8; 8];
        xof.fill(&mut b);
        let v = u64::from_le_bytes(b);
        if v < limit {
            return (v % width) as i64 - i64::from(spread);
        }
    };
    draw() + draw()
}

/// One sponsor's query allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetPolicy {
    /// Most counts in any sliding 60-second window.
    pub per_minute: u32,
    /// Most counts ever.
    pub total: u64,
}

/// Why a count was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    #[error(
        "rate limit reached: at most {per_minute} counts per minute; try again in {} s",
        retry_after.as_secs().max(1)
    )]
    RateLimited {
        per_minute: u32,
        retry_after: Duration,
    },
    #[error(
        "query budget spent: all {total} counts allowed to this sponsor are used; ask the \
         operator to raise the budget"
    )]
    Exhausted { total: u64 },
}

/// What remains after a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub total: u64,
    pub this_minute: u32,
}

/// A sponsor's budget state; serialize it to persist it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryBudget {
    policy: BudgetPolicy,
    spent: u64,
    /// Times (ms since the Unix epoch) of the counts of the last minute, oldest first.
    recent: VecDeque<u64>,
}

const MINUTE_MS: u64 = 60_000;

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl QueryBudget {
    /// A fresh budget.
    pub fn new(policy: BudgetPolicy) -> QueryBudget {
        QueryBudget {
            policy,
            spent: 0,
            recent: VecDeque::new(),
        }
    }

    /// The allowance.
    pub fn policy(&self) -> BudgetPolicy {
        self.policy
    }

    /// Counts charged so far.
    pub fn spent(&self) -> u64 {
        self.spent
    }

    /// Changes the allowance, keeping what was spent.
    pub fn set_policy(&mut self, policy: BudgetPolicy) {
        self.policy = policy;
    }

    /// Charges one count at `now`, or says why not (charging nothing).
    pub fn charge(&mut self, now: SystemTime) -> Result<Remaining, BudgetError> {
        let now = millis(now);
        while self
            .recent
            .front()
            .is_some_and(|&t| t.saturating_add(MINUTE_MS) <= now)
        {
            self.recent.pop_front();
        }
        if self.spent >= self.policy.total {
            return Err(BudgetError::Exhausted {
                total: self.policy.total,
            });
        }
        if self.recent.len() >= self.policy.per_minute as usize {
            let oldest = self.recent.front().copied().unwrap_or(now);
            let wait = oldest.saturating_add(MINUTE_MS).saturating_sub(now);
            return Err(BudgetError::RateLimited {
                per_minute: self.policy.per_minute,
                retry_after: Duration::from_millis(wait),
            });
        }
        self.spent += 1;
        self.recent.push_back(now);
        Ok(Remaining {
            total: self.policy.total - self.spent,
            this_minute: self.policy.per_minute - self.recent.len() as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> BrokerSecret {
        BrokerSecret::from_bytes([b; 32])
    }

    fn hashes(i: u8) -> (DefinitionHash, ConsentHash) {
        (DefinitionHash([i; 32]), ConsentHash([7; 32]))
    }

    #[test]
    fn small_counts_are_hidden() {
        let p = ProtectionPolicy::default();
        for exact in 0..11 {
            let (d, c) = hashes(exact as u8);
            assert_eq!(
                protect_count(exact, &d, &c, &secret(1), &p),
                ProtectedCount::Below(11)
            );
        }
        assert_eq!(ProtectedCount::Below(11).to_string(), "<11");
    }

    #[test]
    fn larger_counts_are_noisy_rounded_and_never_below_threshold() {
        let p = ProtectionPolicy::default();
        let mut seen_noise = std::collections::BTreeSet::new();
        for i in 0..200u8 {
            let (d, c) = hashes(i);
            for exact in [11u64, 12, 100, 12_345] {
                match protect_count(exact, &d, &c, &secret(9), &p) {
                    ProtectedCount::About(n) => {
                        assert_eq!(n % 5, 0);
                        assert!(n >= 11);
                        assert!(n.abs_diff(exact) <= 6 + 2, "{exact} -> {n}");
                        if exact == 12_345 {
                            seen_noise.insert(n);
                        }
                    }
                    ProtectedCount::Below(t) => {
                        assert_eq!(t, 11);
                        assert!(exact < 20);
                    }
                }
            }
        }
        // The noise actually varies with the seed.
        assert!(seen_noise.len() >= 3, "{seen_noise:?}");
    }

    #[test]
    fn same_seed_same_answer_other_secret_other_noise() {
        let p = ProtectionPolicy::default();
        let (d, c) = hashes(3);
        let a = protect_count(1_000, &d, &c, &secret(1), &p);
        assert_eq!(a, protect_count(1_000, &d, &c, &secret(1), &p));
        let differs = (0..50u8).any(|k| protect_count(1_000, &d, &c, &secret(k), &p) != a);
        assert!(differs);
        assert_eq!(format!("{:?}", secret(1)), "BrokerSecret(..)");
    }

    #[test]
    fn noise_is_triangular_on_its_range() {
        let mut hist = [0u32; 13];
        for i in 0..=255u8 {
            for j in 0..40u8 {
                let d = DefinitionHash([i; 32]);
                let c = ConsentHash([j; 32]);
                let n = noise(&d, &c, &secret(2), 3);
                hist[(n + 6) as usize] += 1;
            }
        }
        // Mode at 0, symmetric-ish, every value reached.
        assert!(hist.iter().all(|&h| h > 0));
        assert!(hist[6] > hist[0] * 4);
    }

    #[test]
    fn budget_rate_limits_and_exhausts() {
        let mut b = QueryBudget::new(BudgetPolicy {
            per_minute: 2,
            total: 3,
        });
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(b.charge(t0).unwrap().this_minute, 1);
        b.charge(t0 + Duration::from_secs(1)).unwrap();
        let err = b.charge(t0 + Duration::from_secs(2)).unwrap_err();
        assert_eq!(
            err,
            BudgetError::RateLimited {
                per_minute: 2,
                retry_after: Duration::from_secs(58)
            }
        );
        assert!(err.to_string().contains("try again in 58 s"));
        assert_eq!(b.spent(), 2);
        let r = b.charge(t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(r.total, 0);
        let err = b.charge(t0 + Duration::from_secs(500)).unwrap_err();
        assert_eq!(err, BudgetError::Exhausted { total: 3 });
        // It persists.
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<QueryBudget>(&json).unwrap(), b);
    }
}
