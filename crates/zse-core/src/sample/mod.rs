//! Sampling: logits processors (bias, penalties, temperature, top-k, top-p, min-p)
//! and the choice of the next token, with a per-request seeded generator so that a
//! seed reproduces the output. Log-probabilities are those of the model's own
//! distribution (before any processing), as OpenAI and llama.cpp report them.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};

/// Most alternatives a caller may ask log-probabilities for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub min_p: f32,
    /// Multiplicative penalty on every token seen (prompt and output); 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI's additive penalties on tokens already generated.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let bad = Error::invalid_argument;
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(bad(
                "temperature",
                format!("{} must be a number >= 0", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", format!("{} must be in (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad("min_p", format!("{} must be in [0, 1]", self.min_p)));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(bad(
                "repetition_penalty",
                format!("{} must be > 0", self.repetition_penalty),
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(bad(name, format!("{v} must be in [-2, 2]")));
            }
        }
        for &(id, b) in &self.logit_bias {
            if id as usize >= vocab_size {
                return Err(bad(
                    "logit_bias",
                    format!("token id {id} is outside the vocabulary (size {vocab_size})"),
                ));
            }
            if !(-100.0..=100.0).contains(&b) {
                return Err(bad(
                    "logit_bias",
                    format!("bias {b} for token {id} must be in [-100, 100]"),
                ));
            }
        }
        Ok(())
    }
}

/// The token picked at one step, with log-probabilities when asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: Option<f32>,
    /// Most likely alternatives `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token occurred in the output so far (penalties).
    counts: HashMap<u32, u32>,
    /// Tokens of the prompt and output (repetition penalty).
    seen: std::collections::HashSet<u32>,
}

/// Natural-log softmax, computed in f64 for stable small probabilities.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| ((l as f64) - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&l| ((l as f64) - lse) as f32).collect()
}

/// Indices of the `n` largest values, largest first (ties: lower index first).
pub fn top_n(values: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let n = n.min(values.len());
    if n == 0 {
        return Vec::new();
    }
    let cmp = |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    };
    idx.select_nth_unstable_by(n - 1, cmp);
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, values[i as usize])).collect()
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => ChaCha8Rng::seed_from_u64(s),
            None => ChaCha8Rng::from_rng(&mut rand::rng()),
        };
        Self {
            params,
            rng,
            counts: HashMap::new(),
            seen: prompt.iter().copied().collect(),
        }
    }

    /// Picks the next token from `logits` (modified in place). `logprobs`: None for
    /// no log-probabilities, Some(n) for the chosen token's and n alternatives.
    pub fn sample(&mut self, logits: &mut [f32], logprobs: Option<usize>) -> Sampled {
        self.sample_masked(logits, logprobs, |_| {})
    }

    /// `sample`, with `mask` applied to the processed logits just before the pick
    /// (a grammar's); reported log-probabilities are the model's, as without it.
    pub fn sample_masked(
        &mut self,
        logits: &mut [f32],
        logprobs: Option<usize>,
        mask: impl FnOnce(&mut [f32]),
    ) -> Sampled {
        let reported = logprobs.map(|n| (log_softmax(logits), n));
        self.process(logits);
        mask(logits);
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        self.counts
            .entry(token)
            .and_modify(|c| *c += 1)
            .or_insert(1);
        self.seen.insert(token);
        match reported {
            Some((lp, n)) => Sampled {
                token,
                logprob: Some(lp[token as usize]),
                top: top_n(&lp, n),
            },
            None => Sampled {
                token,
                logprob: None,
                top: Vec::new(),
            },
        }
    }

    fn process(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(id, b) in &p.logit_bias {
            logits[id as usize] += b;
        }
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 {
                    *l / p.repetition_penalty
                } else {
                    *l * p.repetition_penalty
                };
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                logits[t as usize] -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let n = logits.len();
        let k = if p.top_k == 0 { n } else { p.top_k.min(n) };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weight = |l: f32| (((l - max) * inv_t) as f64).exp();
        if k == n && p.top_p >= 1.0 && p.min_p <= 0.0 {
            // Nothing is cut: draw in vocabulary order, with no sort (sorting 49k
            // logits per token halved decode at 8 streams).
            let weights: Vec<f64> = logits.iter().map(|&l| weight(l)).collect();
            let total: f64 = weights.iter().sum();
            let mut r = self.rng.random::<f64>() * total;
            for (i, &w) in weights.iter().enumerate() {
                if r < w {
                    return i as u32;
                }
                r -= w;
            }
            return argmax(logits);
        }
        // Candidates by rank, sorted only as far as the cut can reach. With top-k,
        // its k (probabilities among them); else the first few, more while top-p's
        // mass or min-p's floor is not among them (probabilities among all).
        let total_all = (k == n).then(|| logits.iter().map(|&l| weight(l)).sum::<f64>());
        let mut want = if k < n { k } else { k.min(FIRST_CANDIDATES) };
        loop {
            let cand = top_n(logits, want);
            let total =
                total_all.unwrap_or_else(|| cand.iter().map(|&(_, l)| weight(l)).sum::<f64>());
            let probs: Vec<f64> = cand.iter().map(|&(_, l)| weight(l) / total).collect();
            // top-p: the smallest prefix whose mass reaches top_p (at least one token).
            let mut keep = None;
            if p.top_p < 1.0 {
                let mut acc = 0.0;
                for (i, &x) in probs.iter().enumerate() {
                    acc += x;
                    if acc >= p.top_p as f64 {
                        keep = Some(i + 1);
                        break;
                    }
                }
            }
            // min-p: drop tokens below min_p times the top probability.
            let floor = probs[0] * p.min_p as f64;
            let above = probs.iter().take_while(|&&x| x >= floor).count().max(1);
            let min_p_cut = p.min_p > 0.0 && above < probs.len();
            let top_p_cut = keep.is_some();
            if want < k && !(top_p_cut || min_p_cut) {
                // Neither cut falls among these candidates: rank more of them.
                want = (want * 8).min(k);
                continue;
            }
            let mut keep = keep.unwrap_or(probs.len());
            if p.min_p > 0.0 {
                keep = keep.min(above);
            }
            let kept = &probs[..keep];
            let sum: f64 = kept.iter().sum();
            let mut r = self.rng.random::<f64>() * sum;
            for (i, &x) in kept.iter().enumerate() {
                if r < x {
                    return cand[i].0;
                }
                r -= x;
            }
            return cand[keep - 1].0;
        }
    }
}

/// Candidates ranked at first when top-p or min-p cuts the distribution: enough for
/// the usual cut (it keeps a few dozen tokens), far fewer than a vocabulary.
const FIRST_CANDIDATES: usize = 256;

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_picks_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams::greedy(), &[]);
        let r = s.sample(&mut logits(), Some(2));
        assert_eq!(r.token, 1);
        let lp = log_softmax(&logits());
        assert_eq!(r.logprob, Some(lp[1]));
        assert_eq!(r.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 4]);
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn seed_reproduces_and_top_k_restricts() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 2,
            seed: Some(7),
            ..Default::default()
        };
        let run = || {
            let mut s = Sampler::new(params.clone(), &[]);
            (0..50)
                .map(|_| s.sample(&mut logits(), None).token)
                .collect::<Vec<_>>()
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().all(|&t| t == 1 || t == 4));
        assert!(a.contains(&1) && a.contains(&4));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let p = SamplingParams {
            top_p: 0.01,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[]);
        assert!((0..20).all(|_| s.sample(&mut logits(), None).token == 1));
        let p = SamplingParams {
            min_p: 0.95,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[]);
        // Token 4 (2.9) has ~0.90 of token 1's probability: cut.
        assert!((0..20).all(|_| s.sample(&mut logits(), None).token == 1));
    }

    #[test]
    fn drawing_follows_the_softmax() {
        // No cut: the unsorted draw. Frequencies within 3% of exp(l / t) / Z.
        let l = logits();
        let p = SamplingParams {
            temperature: 0.8,
            seed: Some(3),
            ..Default::default()
        };
        let mut s = Sampler::new(p, &[]);
        let draws = 40_000;
        let mut counts = [0usize; 5];
        for _ in 0..draws {
            counts[s.sample(&mut l.clone(), None).token as usize] += 1;
        }
        let w: Vec<f64> = l.iter().map(|&x| (x as f64 / 0.8).exp()).collect();
        let z: f64 = w.iter().sum();
        for (c, w) in counts.iter().zip(&w) {
            assert!(
                (*c as f64 / draws as f64 - w / z).abs() < 0.03,
                "{counts:?}"
            );
        }
    }

    #[test]
    fn cuts_deeper_than_the_first_candidates_rank_more() {
        // 5000 nearly flat logits: top-p 0.5 keeps ~2500 tokens, min-p 0.5 all
        // within a factor of two of the best, so both must rank past the first 256.
        let l: Vec<f32> = (0..5000).map(|i| -(i as f32) * 1e-4).collect();
        for p in [
            SamplingParams {
                top_p: 0.5,
                seed: Some(9),
                ..Default::default()
            },
            SamplingParams {
                min_p: 0.5,
                seed: Some(9),
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(p.clone(), &[]);
            let picks: Vec<u32> = (0..2000)
                .map(|_| s.sample(&mut l.clone(), None).token)
                .collect();
            let deepest = *picks.iter().max().unwrap();
            // Past the first candidates, and inside the cut (top-p's mass, or
            // min-p's floor at rank 5000 * ln 2 ~ 6931: every token here).
            assert!(deepest as usize > FIRST_CANDIDATES, "{p:?}: {deepest}");
            if p.top_p < 1.0 {
                assert!(deepest < 2700, "{deepest}");
            }
        }
    }

    #[test]
    fn penalties_and_bias_move_the_choice() {
        let p = SamplingParams {
            logit_bias: vec![(3, 10.0)],
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(p, &[]).sample(&mut logits(), None).token, 3);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        assert_eq!(Sampler::new(p, &[1]).sample(&mut logits(), None).token, 4);
        let p = SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, &[]);
        assert_eq!(s.sample(&mut logits(), None).token, 1);
        assert_eq!(s.sample(&mut logits(), None).token, 4);
    }

    #[test]
    fn validation_names_the_parameter() {
        let cases = [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    presence_penalty: 3.0,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(99, 1.0)],
                    ..Default::default()
                },
                "logit_bias",
            ),
        ];
        for (p, name) in cases {
            match p.validate(10) {
                Err(Error::InvalidArgument { param, .. }) => assert_eq!(param, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(SamplingParams::default().validate(10).is_ok());
    }
}
