//! Stop strings matched across token boundaries. Text that could still turn out to
//! be the start of a stop string is held back, so no part of a stop string ever
//! reaches the caller, and the returned text ends just before the stop string.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopStatus {
    /// Keep generating; this text is safe to emit.
    Continue(String),
    /// A stop string was found: emit this text, then finish.
    Stopped(String),
}

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not emitted yet (always shorter than the longest stop).
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    /// A matcher for the same stop strings with nothing seen yet.
    pub fn fresh(&self) -> Self {
        Self::new(self.stops.clone())
    }

    pub fn push(&mut self, delta: &str) -> StopStatus {
        if self.stops.is_empty() {
            return StopStatus::Continue(delta.to_string());
        }
        self.pending.push_str(delta);
        // Every stop string that occurs must start inside `pending`: emitted text never
        // ends with a prefix of a stop string.
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return StopStatus::Stopped(out);
        }
        let hold = self.held_suffix_len();
        let emit = self.pending.len() - hold;
        StopStatus::Continue(self.pending.drain(..emit).collect())
    }

    /// The longest suffix of `pending` that is a prefix of some stop string.
    fn held_suffix_len(&self) -> usize {
        let len = self.pending.len();
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        for k in (1..longest.min(len + 1)).rev() {
            let start = len - k;
            if !self.pending.is_char_boundary(start) {
                continue;
            }
            let suffix = &self.pending[start..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                return k;
            }
        }
        0
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopStatus::Continue(t) => out.push_str(&t),
                StopStatus::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_across_tokens_is_cut_before_it() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn partial_match_is_held_then_released() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc ST"), StopStatus::Continue("abc ".into()));
        assert_eq!(m.push("ART"), StopStatus::Continue("START".into()));
        assert_eq!(run(&["STOP"], &["x ST"]), ("x ST".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_unicode_is_safe() {
        assert_eq!(run(&["b", "cd"], &["a", "cdb"]), ("a".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }
}
