//! Word frequencies of a chunk of text: the text travels in the arguments,
//! the counts come back, and merging them gives the counts of the whole.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use wasmgrid_guest::task;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WordCounts {
    pub words: u64,
    pub counts: BTreeMap<String, u64>,
}

impl WordCounts {
    pub fn merge(&mut self, other: &WordCounts) {
        self.words += other.words;
        for (word, n) in &other.counts {
            *self.counts.entry(word.clone()).or_insert(0) += n;
        }
    }

    /// The `n` most frequent words, most frequent first, ties alphabetical.
    pub fn top(&self, n: usize) -> Vec<(&str, u64)> {
        let mut all: Vec<(&str, u64)> = self.counts.iter().map(|(w, c)| (w.as_str(), *c)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        all.truncate(n);
        all
    }
}

#[task]
fn count_words(text: String) -> WordCounts {
    count(&text)
}

/// Words are maximal runs of alphanumeric characters (and inner apostrophes), lowercased.
pub fn count(text: &str) -> WordCounts {
    let mut result = WordCounts::default();
    for word in text
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty())
    {
        result.words += 1;
        *result.counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lowercased_words() {
        let c = count("The cat and the hat. THE END, isn't it?");
        assert_eq!(c.words, 9);
        assert_eq!(c.counts["the"], 3);
        assert_eq!(c.counts["isn't"], 1);
        assert_eq!(c.top(1), [("the", 3)]);
    }

    #[test]
    fn merged_chunks_equal_the_whole() {
        let text = "a b c a b a";
        let mut merged = count("a b c");
        merged.merge(&count("a b a"));
        assert_eq!(merged, count(text));
    }
}
