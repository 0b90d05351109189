//! [`Pattern`]: a rule that the API states as a JSON Schema pattern, matched by the server with
//! that very pattern, compiled once into a DFA.
//!
//! A compiled DFA decides a short text in a few dozen nanoseconds (one table step a byte), so a
//! pattern can be the rule itself even where it runs on every request (a conversation id, an
//! event name, a repository) instead of code beside it that restates it. Each starts with `^`
//! (so that a search stops as soon as the text cannot match, however long it is) and reads as
//! JSON Schema reads it: `$` is the very end of the text.

use regex_automata::dfa::{dense, Automaton};
use regex_automata::{Anchored, Input};

/// A JSON Schema pattern compiled into a DFA. Kept in a `LazyLock` beside the rule it checks,
/// so that it is compiled once, on first use.
pub struct Pattern {
    dfa: dense::DFA<Vec<u32>>,
}

impl Pattern {
    /// Compiles `source`, a pattern of the program (never input) that starts with `^`; one
    /// that does not, or does not compile, is a bug that panics on first use (the unit tests
    /// of each rule find it).
    pub fn new(source: &str) -> Self {
        assert!(source.starts_with('^'), "a Pattern starts with ^: {source}");
        let dfa = dense::DFA::new(source)
            .unwrap_or_else(|e| panic!("the pattern {source} compiles: {e}"));
        Pattern { dfa }
    }

    /// Whether `text` matches. A search error (none can happen: the DFA has no quit bytes and
    /// the patterns no Unicode word boundaries) counts as no match.
    pub fn is_match(&self, text: &str) -> bool {
        self.dfa
            .try_search_fwd(&Input::new(text).anchored(Anchored::Yes))
            .is_ok_and(|m| m.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_as_json_schema_reads_the_pattern() {
        let ab = Pattern::new("^a[0-9]{1,3}$");
        for good in ["a1", "a123"] {
            assert!(ab.is_match(good), "{good}");
        }
        for bad in ["", "a", "a1234", "ba1", "a1\n", "\na1", "a1b", "A1", "a١"] {
            assert!(!ab.is_match(bad), "{bad:?}");
        }
        let prefix = Pattern::new("^(?:[Hh]ttps?)://");
        assert!(prefix.is_match("https://x"));
        assert!(!prefix.is_match(" https://x"));
    }
}
