//! "Did you mean": the closest known word to a misspelt one, for every error that names a
//! field, kind, stage, value or parameter.

/// Closest candidate to `word` (edit distance at most a third of its length, at least 1).
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (strsim::osa_distance(word, c), c))
        .filter(|(distance, _)| *distance <= limit && *distance < word.chars().count())
        .min()
        .map(|(_, c)| c)
}

pub fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    match suggest(word, candidates.iter().copied()) {
        Some(best) => format!("; did you mean `{best}`?"),
        None => format!(" (expected one of: {})", candidates.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_allow_typos_and_transpositions_but_not_unrelated_words() {
        assert_eq!(suggest("comand", ["command", "images"]), Some("command"));
        assert_eq!(suggest("rnu", ["run", "needs"]), Some("run"));
        assert_eq!(
            suggest("learnign_rate", ["learning_rate", "steps"]),
            Some("learning_rate")
        );
        assert_eq!(suggest("b", ["a"]), None);
        assert_eq!(suggest("zzz", ["prep", "train"]), None);
    }
}
