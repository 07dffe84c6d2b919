//! Which capsule fragments the broker verifies before it forwards them.
//!
//! The researcher's agent verifies every fragment it receives, so the broker's own check
//! is there to route around a proxy that lies or is broken, not to protect the
//! researcher. Verifying every fragment cost the broker about as much as the proxies'
//! re-encryption itself (two `CapsuleFrag::verify` and a capsule parse per envelope), so
//! the broker verifies a random sample of each proxy's answer — at least one fragment,
//! and one in [`SAMPLE_EVERY`] — and, from the first fragment of a proxy that fails, every
//! fragment of that proxy for as long as the broker runs ([`Suspects`]). A failed
//! fragment is discarded and its envelope asked of the other proxies.
//!
//! What this guarantees: a proxy whose every fragment is wrong (down to a wrong key, a
//! replaced kfrag, garbage) is caught on its first answer and routed around from then on,
//! as before. A proxy that corrupts a fraction `f` of an answer of `m` fragments escapes
//! that answer's sample with probability about `(1 − f)^⌈m/16⌉`; a corrupt fragment that
//! escapes reaches the researcher's agent, which refuses it (it never decrypts with it).

use std::collections::HashSet;
use std::sync::Mutex;

use rand::Rng;
use rand::seq::index::sample;
use rayon::prelude::*;

/// One fragment in this many (and at least one per answer) is verified from a proxy
/// that has not failed.
pub const SAMPLE_EVERY: usize = 16;

/// The proxies (by index) that answered a fragment that failed verification: every
/// fragment of theirs is verified from then on.
#[derive(Debug, Default)]
pub struct Suspects(Mutex<HashSet<usize>>);

impl Suspects {
    fn snapshot(&self) -> HashSet<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn add(&self, proxy: usize) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(proxy)
    }

    /// Whether a fragment of `proxy` failed verification since the broker started.
    #[cfg(test)]
    pub fn contains(&self, proxy: usize) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&proxy)
    }
}

/// One fragment as a proxy answered it, for the item at `item` of a batch.
#[derive(Debug, Clone)]
pub struct Answer {
    pub proxy: usize,
    pub item: usize,
    pub cfrag: Vec<u8>,
}

/// What the screening kept and found.
#[derive(Debug, Default)]
pub struct Screened {
    /// (item, fragment) to forward.
    pub accepted: Vec<(usize, Vec<u8>)>,
    /// Fragments that failed verification.
    pub rejected: usize,
    /// Fragments verified.
    pub verified: usize,
    /// Proxies found lying in this batch.
    pub caught: Vec<usize>,
}

/// Screens a batch of answers: verifies a sample of each proxy's fragments and all of a
/// suspect's; a proxy whose fragment fails becomes a suspect, and the rest of its batch is
/// verified too. `verify(item, fragment)` says whether the fragment verifies, or `None`
/// when the broker cannot check it (its own copy of the capsule or keys does not parse):
/// such a fragment is dropped without blaming the proxy.
pub fn screen(
    answers: Vec<Answer>,
    suspects: &Suspects,
    rng: &mut impl Rng,
    verify: impl Fn(usize, &[u8]) -> Option<bool> + Sync,
) -> Screened {
    let suspect = suspects.snapshot();
    let mut check = vec![false; answers.len()];
    let mut proxies: Vec<usize> = answers.iter().map(|a| a.proxy).collect();
    proxies.sort_unstable();
    proxies.dedup();
    for p in proxies {
        let mine: Vec<usize> = (0..answers.len())
            .filter(|&j| answers[j].proxy == p)
            .collect();
        if suspect.contains(&p) {
            mine.iter().for_each(|&j| check[j] = true);
        } else {
            let k = mine.len().div_ceil(SAMPLE_EVERY);
            for pick in sample(rng, mine.len(), k) {
                check[mine[pick]] = true;
            }
        }
    }
    let run = |check: &[bool], done: &[Option<Option<bool>>]| -> Vec<Option<Option<bool>>> {
        answers
            .par_iter()
            .zip(check.par_iter().zip(done.par_iter()))
            .map(|(a, (&c, d))| match d {
                Some(r) => Some(*r),
                None if c => Some(verify(a.item, &a.cfrag)),
                None => None,
            })
            .collect()
    };
    let mut results = run(&check, &vec![None; answers.len()]);
    let mut caught = Vec::new();
    for (a, r) in answers.iter().zip(&results) {
        if *r == Some(Some(false)) && !suspect.contains(&a.proxy) && !caught.contains(&a.proxy) {
            caught.push(a.proxy);
        }
    }
    if !caught.is_empty() {
        for &p in &caught {
            suspects.add(p);
        }
        let all: Vec<bool> = answers.iter().map(|a| caught.contains(&a.proxy)).collect();
        results = run(&all, &results);
    }
    let mut out = Screened {
        caught,
        ..Default::default()
    };
    for (a, r) in answers.into_iter().zip(results) {
        match r {
            Some(Some(true)) => {
                out.verified += 1;
                out.accepted.push((a.item, a.cfrag));
            }
            Some(Some(false)) => {
                out.verified += 1;
                out.rejected += 1;
            }
            Some(None) => {}
            // Not sampled, from a proxy that has not failed.
            None => out.accepted.push((a.item, a.cfrag)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn answers(proxy: usize, n: usize, bad: impl Fn(usize) -> bool) -> Vec<Answer> {
        (0..n)
            .map(|i| Answer {
                proxy,
                item: i,
                cfrag: vec![u8::from(bad(i))],
            })
            .collect()
    }

    fn honest(_: usize, c: &[u8]) -> Option<bool> {
        Some(c == [0])
    }

    #[test]
    fn a_sample_of_an_honest_proxy_and_all_of_a_liar_are_verified() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let suspects = Suspects::default();
        // Two honest proxies, 128 fragments each: 8 of each verified, all forwarded.
        let mut batch = answers(0, 128, |_| false);
        batch.extend(answers(1, 128, |_| false));
        let s = screen(batch, &suspects, &mut rng, honest);
        assert_eq!(s.accepted.len(), 256);
        assert_eq!(s.verified, 16);
        assert!(s.caught.is_empty());

        // A proxy lying on every fragment is caught at once: none of its fragments is
        // forwarded, the honest one's are.
        let mut batch = answers(0, 128, |_| false);
        batch.extend(answers(2, 128, |_| true));
        let s = screen(batch, &suspects, &mut rng, honest);
        assert_eq!(s.caught, vec![2]);
        assert_eq!(s.rejected, 128);
        assert_eq!(s.accepted.len(), 128);
        assert!(s.accepted.iter().all(|(_, c)| c == &[0]));
        assert!(suspects.contains(2));

        // From then on every fragment of the suspect is verified, even honest ones.
        let s = screen(answers(2, 40, |i| i == 39), &suspects, &mut rng, honest);
        assert_eq!(s.verified, 40);
        assert_eq!(s.accepted.len(), 39);
        assert!(s.caught.is_empty(), "already a suspect");

        // A fragment the broker cannot check is dropped without blame.
        let s = screen(answers(0, 1, |_| false), &suspects, &mut rng, |_, _| None);
        assert!(s.accepted.is_empty() && s.caught.is_empty());
        assert!(!suspects.contains(0));
    }

    #[test]
    fn a_sparse_liar_is_caught_about_as_often_as_the_sample_predicts() {
        // One bad fragment in 128: caught in about 8/128 of batches.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut caught = 0;
        for _ in 0..2000 {
            let suspects = Suspects::default();
            let s = screen(answers(0, 128, |i| i == 5), &suspects, &mut rng, honest);
            caught += usize::from(!s.caught.is_empty());
        }
        let rate = caught as f64 / 2000.0;
        assert!((0.04..0.09).contains(&rate), "{rate}");
    }
}
