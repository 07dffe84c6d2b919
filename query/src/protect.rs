//! Protected counts: what a sponsor may see of an exact count, and how much a sponsor may
//! ask.
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
//! ## One draw per question, per snapshot, per index
//!
//! Noise only protects if a sponsor cannot collect many independent draws of it for one
//! count and average them away. So the noise is a deterministic function of *what is
//! counted*, and each fresh draw a sponsor sees is paid for:
//!
//! * **A draw** ([`DrawId`]) is named by BLAKE3 over the normalized form of one attrition
//!   step (the index and the criteria up to that step, as a set: order-free, deduplicated,
//!   rewritten to one canonical form — see [`CohortDefinition::normalized`]) and the
//!   [`CountBasis`]: the study's consent snapshot and the [`IndexVersion`] of the index
//!   counted. The noise is keyed BLAKE3 of the draw id under the broker's secret, so
//!   without the secret nobody can compute it.
//! * Hence the same question, an equivalent one written in another order or spelling, and
//!   a step repeated 50 times in one definition all show the *same* draw: 50 identical
//!   step counts are one sample, not 50. The final count is the last step's draw.
//! * A changed snapshot (consents granted, revoked, expired) or a changed index (an
//!   upload, new concept relations) names new draws: the same noise is never added to two
//!   different exact counts, so re-asking after a change cannot difference one draw
//!   against itself.
//! * **The budget** ([`QueryBudget`]) charges one unit per draw the sponsor has not been
//!   charged for before ([`Draws::of`] lists a definition's draws): a definition whose
//!   steps are all known costs nothing, one with 40 differently-written steps costs 40.
//!   So the number of independent noise samples a sponsor holds is at most the units it
//!   was charged — the quantity the bound below is stated in.
//!
//! ### Why not key the noise by the counted person set?
//!
//! Keying by each step's exact result set would make *every* equivalent question (whatever
//! its syntax) share one draw, but it turns equality of answers into an oracle for
//! equality of sets: a sponsor asking `C` and `C ∧ not u` (u: a trait only the target
//! has) gets identical answers exactly when the target is outside `C`, and, with the
//! default policy, different ones with probability 0.58 when the target is inside — a
//! correct guess 79 % of the time from two questions. Keying by the question keeps the
//! noise independent of the data, and the budget prices the syntactic variants instead.
//!
//! ## The bound
//!
//! Let `δ` be [`ProtectionPolicy::neighbour_distance`]: the largest total variation
//! distance between the answers to two exact counts that differ by one (exactly, by
//! enumerating the noise). For the default policy `δ = 15/49 ≈ 0.306`, reached at the
//! threshold (10 is always `<11`, 11 shows as `15` with probability 15/49), and
//! `δ = 1/7 ≈ 0.143` between counts that are both at least 11. Two data sets that differ in
//! one patient give counts that differ by at most one for every draw, with noise
//! independent between distinct draws (BLAKE3 as a pseudorandom function). A sponsor that
//! was charged `k` units therefore sees views of the two data sets at total variation at
//! most `1 − (1 − δ)^k ≤ kδ`, and guesses any fact about the one patient (with an even
//! prior) correctly with probability at most `½ + (1 − (1 − δ)^k) / 2` — 0.65 for one
//! unit (0.57 away from the threshold), whatever it averages or differences.
//! `tests/tests/averaging.rs` measures such sponsors and checks this.
//!
//! Prior art: SHRINE adds Gaussian noise (σ 1.33, clamped to ±3) to counts above 10 and
//! stores the noise per result, so a re-run of the same query draws new noise; Leaf reports
//! counts at or below a threshold as under it and shifts the rest by a uniform amount
//! seeded by an MD5 of the query's sorted concept ids (reordering-invariant, but unkeyed:
//! anyone with the code and the query can compute the shift). Here the seed is
//! reordering-invariant *and* keyed, and every fresh draw is charged.
//!
//! ## Budgets
//!
//! [`QueryBudget`] holds one sponsor's allowance: at most `per_minute` counts (calls) in
//! any sliding minute and `total` units (fresh draws) overall. The broker persists it (it
//! serializes) and charges it before running a count.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::consent::ConsentHash;
use crate::definition::{CohortDefinition, DefinitionHash};
use crate::engine::{CountResult, IndexVersion};

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

impl ProtectionPolicy {
    /// What an exact count shows with a given noise.
    fn shown(&self, exact: u64, noise: i64) -> ProtectedCount {
        let threshold = self.threshold;
        if exact < threshold {
            return ProtectedCount::Below(threshold);
        }
        let noisy = (i128::from(exact) + i128::from(noise)).max(0) as u128;
        let step = u128::from(self.round_to.max(1));
        let rounded = (noisy + step / 2) / step * step;
        let rounded = u64::try_from(rounded).unwrap_or(u64::MAX);
        if rounded < threshold {
            ProtectedCount::Below(threshold)
        } else {
            ProtectedCount::About(rounded)
        }
    }

    /// The answers an exact count can show and their probabilities over the noise, exactly
    /// (by enumerating both uniform terms), most likely first.
    pub fn answers(&self, exact: u64) -> Vec<(ProtectedCount, f64)> {
        let spread = i64::from(self.noise);
        let mut counts: Vec<(ProtectedCount, u64)> = Vec::new();
        for u1 in -spread..=spread {
            for u2 in -spread..=spread {
                let shown = self.shown(exact, u1 + u2);
                match counts.iter_mut().find(|(c, _)| *c == shown) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((shown, 1)),
                }
            }
        }
        let total = ((2 * spread + 1) * (2 * spread + 1)) as f64;
        let mut out: Vec<(ProtectedCount, f64)> = counts
            .into_iter()
            .map(|(c, n)| (c, n as f64 / total))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }

    /// The probability that an exact count shows `answer`.
    pub fn probability(&self, exact: u64, answer: ProtectedCount) -> f64 {
        self.answers(exact)
            .into_iter()
            .find(|(c, _)| *c == answer)
            .map_or(0.0, |(_, p)| p)
    }

    /// `δ`: the largest total variation distance between the answers to exact counts `n`
    /// and `n + 1`, over every `n ≥ from` (exact; the answers repeat with period `round_to`
    /// once the threshold is out of reach, so a finite range covers every `n`).
    pub fn neighbour_distance(&self, from: u64) -> f64 {
        let reach = 2 * u64::from(self.noise) + 2 * self.round_to.max(1) + 2;
        let last = from.max(self.threshold) + reach;
        (from..=last)
            .map(|n| {
                let (a, b) = (self.answers(n), self.answers(n + 1));
                let mut keys: Vec<ProtectedCount> = a.iter().chain(&b).map(|x| x.0).collect();
                keys.sort_unstable_by_key(|k| match k {
                    ProtectedCount::Below(t) => (0, *t),
                    ProtectedCount::About(v) => (1, *v),
                });
                keys.dedup();
                let p = |set: &[(ProtectedCount, f64)], k| {
                    set.iter().find(|x| x.0 == k).map_or(0.0, |x| x.1)
                };
                keys.into_iter()
                    .map(|k| (p(&a, k) - p(&b, k)).abs())
                    .sum::<f64>()
                    / 2.0
            })
            .fold(0.0, f64::max)
    }
}

/// A count as a sponsor may see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let s = String::deserialize(d)?;
                let bad = || serde::de::Error::custom("expected 64 hex digits");
                if s.len() != 64 {
                    return Err(bad());
                }
                let mut out = [0u8; 32];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                        .map_err(|_| bad())?;
                }
                Ok($name(out))
            }
        }
    };
}

hex_id! {
    /// What a count was computed over besides the question: the study's consent snapshot
    /// and the version of the index. A change of either names new draws.
    CountBasis
}

hex_id! {
    /// One noise draw: an attrition step's normalized question over one [`CountBasis`].
    /// Not secret (the noise is keyed by the broker's secret); the budget records it.
    DrawId
}

impl CountBasis {
    /// The basis of counts under `consent` over the index at `index`.
    pub fn new(consent: &ConsentHash, index: &IndexVersion) -> CountBasis {
        let mut h = blake3::Hasher::new_derive_key("cohort-query 2026 count basis v1");
        h.update(&consent.0);
        h.update(&index.0);
        CountBasis(*h.finalize().as_bytes())
    }
}

fn draw_id(basis: &CountBasis, step: &DefinitionHash) -> DrawId {
    let mut h = blake3::Hasher::new_derive_key("cohort-query 2026 noise draw v1");
    h.update(&basis.0);
    h.update(&step.0);
    DrawId(*h.finalize().as_bytes())
}

/// The noise draws a protected answer to one definition shows: one per attrition step
/// (step 0 is the population; the final count is the last step's draw). Equivalent steps
/// share a draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draws {
    basis: CountBasis,
    steps: Vec<DrawId>,
}

impl Draws {
    /// The draws of `definition` (which must be valid) over `basis`.
    pub fn of(definition: &CohortDefinition, basis: &CountBasis) -> Draws {
        let steps = (0..=definition.criteria.len())
            .map(|k| draw_id(basis, &definition.prefix(k).normalized().hash))
            .collect();
        Draws {
            basis: *basis,
            steps,
        }
    }

    pub fn basis(&self) -> CountBasis {
        self.basis
    }

    /// The draw of attrition step `k` (the last step's for `k` past the end).
    pub fn step(&self, k: usize) -> DrawId {
        self.steps[k.min(self.steps.len() - 1)]
    }

    /// The draw of the final count.
    pub fn last(&self) -> DrawId {
        self.step(usize::MAX)
    }

    /// The distinct draws: what an answer reveals samples of.
    pub fn distinct(&self) -> BTreeSet<DrawId> {
        self.steps.iter().copied().collect()
    }
}

/// The protected form of one exact count under one draw.
pub fn protect_count(
    exact: u64,
    draw: &DrawId,
    secret: &BrokerSecret,
    policy: &ProtectionPolicy,
) -> ProtectedCount {
    if exact < policy.threshold {
        return ProtectedCount::Below(policy.threshold);
    }
    policy.shown(exact, noise(draw, secret, policy.noise))
}

/// The protected form of a count result — the final count and every attrition step —
/// under the draws of the definition it counted ([`Draws::of`]).
pub fn protect(
    result: &CountResult,
    draws: &Draws,
    secret: &BrokerSecret,
    policy: &ProtectionPolicy,
) -> ProtectedResult {
    let attrition: Vec<ProtectedStep> = result
        .attrition
        .iter()
        .map(|s| ProtectedStep {
            step: s.step,
            label: s.label.clone(),
            count: protect_count(s.exact, &draws.step(s.step), secret, policy),
        })
        .collect();
    let count = protect_count(result.exact, &draws.last(), secret, policy);
    ProtectedResult { count, attrition }
}

/// `u1 + u2`, each uniform on `-spread..=spread`, from keyed BLAKE3 of the draw.
fn noise(draw: &DrawId, secret: &BrokerSecret, spread: u32) -> i64 {
    let mut hasher = blake3::Hasher::new_keyed(&secret.0);
    hasher.update(b"cohort-query count noise v2\0");
    hasher.update(&draw.0);
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

/// One sponsor's allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetPolicy {
    /// Most counts (calls) in any sliding 60-second window.
    pub per_minute: u32,
    /// Most units ever: one unit per fresh noise draw (an attrition step not asked before
    /// over the same consent snapshot and index).
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
        "query budget spent: all {total} counts allowed to this sponsor are used (one per \
         attrition step not asked before); repeating earlier questions is still free, or \
         ask the operator to raise the budget"
    )]
    Exhausted { total: u64 },
    #[error(
        "query budget too small for this definition: it needs {needed} new counts (one per \
         attrition step not asked before) and {remaining} remain; ask with fewer new steps, \
         or ask the operator to raise the budget"
    )]
    TooCostly { needed: u64, remaining: u64 },
}

/// What remains after a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    /// Units left.
    pub total: u64,
    /// Calls left in the current minute.
    pub this_minute: u32,
}

/// What one count cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// Units charged: the draws of the answer not charged before.
    pub units: u64,
    pub remaining: Remaining,
}

/// The draws paid for over one basis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Paid {
    basis: CountBasis,
    draws: BTreeSet<DrawId>,
}

/// Draws remembered as paid, across bases; the oldest bases are forgotten first (a
/// forgotten draw is charged again if asked again: never cheaper, only dearer).
const PAID_DRAWS_KEPT: usize = 4096;

/// A sponsor's budget state; serialize it to persist it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryBudget {
    policy: BudgetPolicy,
    spent: u64,
    /// Times (ms since the Unix epoch) of the counts of the last minute, oldest first.
    recent: VecDeque<u64>,
    /// Draws charged, per basis, the most recently used basis last.
    #[serde(default)]
    paid: VecDeque<Paid>,
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
            paid: VecDeque::new(),
        }
    }

    /// The allowance.
    pub fn policy(&self) -> BudgetPolicy {
        self.policy
    }

    /// Units charged so far.
    pub fn spent(&self) -> u64 {
        self.spent
    }

    /// Changes the allowance, keeping what was spent.
    pub fn set_policy(&mut self, policy: BudgetPolicy) {
        self.policy = policy;
    }

    /// The draws of `draws` not charged before: what answering would cost.
    pub fn unpaid(&self, draws: &Draws) -> BTreeSet<DrawId> {
        let paid = self.paid.iter().find(|p| p.basis == draws.basis());
        draws
            .distinct()
            .into_iter()
            .filter(|d| paid.is_none_or(|p| !p.draws.contains(d)))
            .collect()
    }

    /// Whether a call at `now` would pass the rate limit (charging nothing): lets a caller
    /// refuse before doing the work of finding a count's draws.
    pub fn rate_check(&self, now: SystemTime) -> Result<(), BudgetError> {
        let now = millis(now);
        let recent: Vec<u64> = self
            .recent
            .iter()
            .copied()
            .filter(|&t| t.saturating_add(MINUTE_MS) > now)
            .collect();
        if recent.len() >= self.policy.per_minute as usize {
            let oldest = recent.first().copied().unwrap_or(now);
            let wait = oldest.saturating_add(MINUTE_MS).saturating_sub(now);
            return Err(BudgetError::RateLimited {
                per_minute: self.policy.per_minute,
                retry_after: Duration::from_millis(wait),
            });
        }
        Ok(())
    }

    /// Charges a count at `now` whose answer shows `draws`: one call against the rate
    /// limit, and one unit per draw not charged before. Or says why not, charging nothing.
    pub fn charge(&mut self, now: SystemTime, draws: &Draws) -> Result<Charge, BudgetError> {
        self.rate_check(now)?;
        let now = millis(now);
        while self
            .recent
            .front()
            .is_some_and(|&t| t.saturating_add(MINUTE_MS) <= now)
        {
            self.recent.pop_front();
        }
        let fresh = self.unpaid(draws);
        let needed = fresh.len() as u64;
        let remaining = self.policy.total.saturating_sub(self.spent);
        if needed > remaining {
            return Err(if remaining == 0 {
                BudgetError::Exhausted {
                    total: self.policy.total,
                }
            } else {
                BudgetError::TooCostly { needed, remaining }
            });
        }
        self.spent += needed;
        self.recent.push_back(now);
        let basis = draws.basis();
        let mut entry = match self.paid.iter().position(|p| p.basis == basis) {
            Some(i) => self.paid.remove(i).expect("present"),
            None => Paid {
                basis,
                draws: BTreeSet::new(),
            },
        };
        entry.draws.extend(fresh);
        self.paid.push_back(entry);
        while self.paid.len() > 1
            && self.paid.iter().map(|p| p.draws.len()).sum::<usize>() > PAID_DRAWS_KEPT
        {
            self.paid.pop_front();
        }
        Ok(Charge {
            units: needed,
            remaining: Remaining {
                total: self.policy.total - self.spent,
                this_minute: self.policy.per_minute - self.recent.len() as u32,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::CohortDefinition;

    fn secret(b: u8) -> BrokerSecret {
        BrokerSecret::from_bytes([b; 32])
    }

    fn draw(i: u8) -> DrawId {
        DrawId([i; 32])
    }

    fn basis(i: u8) -> CountBasis {
        CountBasis::new(&ConsentHash([i; 32]), &IndexVersion([7; 32]))
    }

    fn def(json: &str) -> CohortDefinition {
        CohortDefinition::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn small_counts_are_hidden() {
        let p = ProtectionPolicy::default();
        for exact in 0..11 {
            assert_eq!(
                protect_count(exact, &draw(exact as u8), &secret(1), &p),
                ProtectedCount::Below(11)
            );
        }
        assert_eq!(ProtectedCount::Below(11).to_string(), "<11");
    }

    #[test]
    fn larger_counts_are_noisy_rounded_and_never_below_threshold() {
        let p = ProtectionPolicy::default();
        let mut seen_noise = BTreeSet::new();
        for i in 0..200u8 {
            for exact in [11u64, 12, 100, 12_345] {
                match protect_count(exact, &draw(i), &secret(9), &p) {
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
        // The noise actually varies with the draw.
        assert!(seen_noise.len() >= 3, "{seen_noise:?}");
    }

    #[test]
    fn same_draw_same_answer_other_secret_other_noise() {
        let p = ProtectionPolicy::default();
        let a = protect_count(1_000, &draw(3), &secret(1), &p);
        assert_eq!(a, protect_count(1_000, &draw(3), &secret(1), &p));
        let differs = (0..50u8).any(|k| protect_count(1_000, &draw(3), &secret(k), &p) != a);
        assert!(differs);
        assert_eq!(format!("{:?}", secret(1)), "BrokerSecret(..)");
    }

    #[test]
    fn noise_is_triangular_on_its_range() {
        let mut hist = [0u32; 13];
        for i in 0..=255u8 {
            for j in 0..40u8 {
                let mut id = [i; 32];
                id[0] = j;
                let n = noise(&DrawId(id), &secret(2), 3);
                hist[(n + 6) as usize] += 1;
            }
        }
        // Mode at 0, symmetric-ish, every value reached.
        assert!(hist.iter().all(|&h| h > 0));
        assert!(hist[6] > hist[0] * 4);
    }

    #[test]
    fn the_answer_distribution_is_the_one_protect_count_draws_from() {
        let p = ProtectionPolicy::default();
        for exact in [10u64, 11, 12, 13, 57, 1_000] {
            let answers = p.answers(exact);
            let total: f64 = answers.iter().map(|a| a.1).sum();
            assert!((total - 1.0).abs() < 1e-12);
            // The empirical distribution over many draws matches the enumeration.
            let trials = 20_000;
            for (answer, prob) in &answers {
                let hits = (0..trials)
                    .filter(|i| {
                        let mut id = [0u8; 32];
                        id[..4].copy_from_slice(&(*i as u32).to_le_bytes());
                        protect_count(exact, &DrawId(id), &secret(4), &p) == *answer
                    })
                    .count() as f64;
                let sd = (prob * (1.0 - prob) / trials as f64).sqrt();
                assert!(
                    (hits / trials as f64 - prob).abs() <= 5.0 * sd + 1e-9,
                    "{exact} -> {answer}: {hits} of {trials}, expected {prob}"
                );
            }
        }
    }

    #[test]
    fn neighbour_distance_of_the_default_policy() {
        let p = ProtectionPolicy::default();
        // 10 is always <11; 11 shows 15 when the noise is at least 2: 15 of 49.
        assert!((p.neighbour_distance(0) - 15.0 / 49.0).abs() < 1e-12);
        assert!((p.neighbour_distance(11) - 7.0 / 49.0).abs() < 1e-12);
        assert!((p.probability(11, ProtectedCount::About(15)) - 15.0 / 49.0).abs() < 1e-12);
        assert_eq!(p.probability(10, ProtectedCount::Below(11)), 1.0);
        // No noise: counts 12 and 13 round apart or together, nothing in between.
        let exact = ProtectionPolicy {
            noise: 0,
            ..ProtectionPolicy::default()
        };
        assert_eq!(exact.neighbour_distance(11), 1.0);
    }

    #[test]
    fn equivalent_steps_share_one_draw() {
        let a = r#"{"condition": {"codes": ["snomed:44054006"]}}"#;
        let rewritten = [
            a.to_string(),
            r#"{"condition": {"codes": ["snomed:44054006", "snomed:44054006"]}}"#.into(),
            format!(r#"{{"all": [{a}]}}"#),
            format!(r#"{{"any": [{a}, {a}]}}"#),
            format!(r#"{{"at_least": {{"n": 1, "of": [{a}]}}}}"#),
            format!(r#"{{"not": {{"not": {a}}}}}"#),
        ];
        let repeated: Vec<String> = (0..50).map(|i| rewritten[i % 6].clone()).collect();
        let d = def(&format!(r#"{{"criteria": [{}]}}"#, repeated.join(",")));
        let draws = Draws::of(&d, &basis(1));
        assert_eq!(
            draws.distinct().len(),
            2,
            "the population and the criterion"
        );
        assert!((1..=50).all(|k| draws.step(k) == draws.step(1)));
        assert_eq!(draws.last(), draws.step(1));
        // The same question over another basis is another draw.
        let other = Draws::of(&d, &basis(2));
        assert!(draws.distinct().is_disjoint(&other.distinct()));
        // A step that adds a (differently written) criterion is a new draw.
        let b = def(&format!(
            r#"{{"criteria": [{a}, {{"not": {{"drug": {{"codes": ["rxnorm:1"]}}}}}}]}}"#
        ));
        assert_eq!(Draws::of(&b, &basis(1)).distinct().len(), 3);
    }

    #[test]
    fn budget_charges_each_fresh_draw_once() {
        let mut b = QueryBudget::new(BudgetPolicy {
            per_minute: 100,
            total: 6,
        });
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let d = def(r#"{"criteria": [{"condition": {"codes": ["snomed:1"]}},
                                     {"drug": {"codes": ["rxnorm:2"]}}]}"#);
        let draws = Draws::of(&d, &basis(1));
        let c = b.charge(t0, &draws).unwrap();
        assert_eq!((c.units, c.remaining.total), (3, 3));
        // Asked again, or reordered: the steps {∅}, {drug}, {condition, drug}: one new.
        assert_eq!(b.charge(t0, &draws).unwrap().units, 0);
        let reordered = def(r#"{"criteria": [{"drug": {"codes": ["rxnorm:2"]}},
                                             {"condition": {"codes": ["snomed:1"]}}]}"#);
        assert_eq!(b.unpaid(&Draws::of(&reordered, &basis(1))).len(), 1);
        assert_eq!(
            b.charge(t0, &Draws::of(&reordered, &basis(1)))
                .unwrap()
                .units,
            1
        );
        // Over a new basis every draw is new: 3 needed, 2 left.
        let err = b.charge(t0, &Draws::of(&d, &basis(2))).unwrap_err();
        assert_eq!(
            err,
            BudgetError::TooCostly {
                needed: 3,
                remaining: 2
            }
        );
        assert!(err.to_string().contains("needs 3 new counts"), "{err}");
        assert_eq!(b.spent(), 4, "a refused count charges nothing");
        let one = def(r#"{"criteria": [{"drug": {"codes": ["rxnorm:2"]}}]}"#);
        assert_eq!(b.charge(t0, &Draws::of(&one, &basis(2))).unwrap().units, 2);
        let err = b.charge(t0, &Draws::of(&d, &basis(2))).unwrap_err();
        assert_eq!(err, BudgetError::Exhausted { total: 6 });
        // Spent, yet what was paid for can still be asked.
        assert_eq!(b.charge(t0, &draws).unwrap().units, 0);
        // It persists, paid draws included.
        let json = serde_json::to_string(&b).unwrap();
        let back: QueryBudget = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
        assert!(back.unpaid(&draws).is_empty());
    }

    #[test]
    fn budget_rate_limits_calls() {
        let mut b = QueryBudget::new(BudgetPolicy {
            per_minute: 2,
            total: 3,
        });
        let d = def(r#"{"criteria": [{"condition": {"codes": ["snomed:1"]}}]}"#);
        let draws = Draws::of(&d, &basis(1));
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(b.charge(t0, &draws).unwrap().remaining.this_minute, 1);
        // Free repeats still count as calls.
        b.charge(t0 + Duration::from_secs(1), &draws).unwrap();
        let err = b.charge(t0 + Duration::from_secs(2), &draws).unwrap_err();
        assert_eq!(
            err,
            BudgetError::RateLimited {
                per_minute: 2,
                retry_after: Duration::from_secs(58)
            }
        );
        assert!(err.to_string().contains("try again in 58 s"));
        assert_eq!(b.rate_check(t0 + Duration::from_secs(2)), Err(err));
        assert_eq!(b.spent(), 2);
        assert!(b.rate_check(t0 + Duration::from_secs(60)).is_ok());
        assert!(b.charge(t0 + Duration::from_secs(60), &draws).is_ok());
    }

    #[test]
    fn old_bases_are_forgotten_and_charged_again() {
        let mut b = QueryBudget::new(BudgetPolicy {
            per_minute: u32::MAX,
            total: u64::MAX,
        });
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let criteria: Vec<String> = (0..100)
            .map(|i| format!(r#"{{"condition": {{"codes": ["snomed:{i}"]}}}}"#))
            .collect();
        let d = def(&format!(r#"{{"criteria": [{}]}}"#, criteria.join(",")));
        for i in 0..60u8 {
            assert_eq!(b.charge(t0, &Draws::of(&d, &basis(i))).unwrap().units, 101);
        }
        let held: usize = b.paid.iter().map(|p| p.draws.len()).sum();
        assert!(held <= PAID_DRAWS_KEPT, "{held}");
        // The latest basis is remembered; the first was forgotten.
        assert_eq!(b.charge(t0, &Draws::of(&d, &basis(59))).unwrap().units, 0);
        assert_eq!(b.charge(t0, &Draws::of(&d, &basis(0))).unwrap().units, 101);
    }
}
