//! Limits on a pipeline file checked before or right after parsing, each in linear time, so a
//! hostile file (100k nested `[`, a huge file, hundreds of thousands of stages) is refused in
//! milliseconds with a message naming the limit (docs/pipelines.md, "Limits").

/// Largest pipeline file.
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// Deepest nesting of flow collections (`[`, `{`); real pipelines use two or three.
pub const MAX_FLOW_DEPTH: usize = 64;
/// Longest stage or pipeline name (names become file names, ids and `$IN_<NAME>`).
pub const MAX_NAME_CHARS: usize = 64;

/// The first text limit `text` exceeds: its (line, column) if known, and the message.
pub fn check_text(text: &str) -> Option<(Option<(usize, usize)>, String)> {
    if text.len() > MAX_FILE_BYTES {
        return Some((
            None,
            format!(
                "the file is {} bytes, over the limit of {MAX_FILE_BYTES} bytes (16 MiB) for a pipeline",
                text.len()
            ),
        ));
    }
    deepest_flow(text).map(|(line, column)| {
        (
            Some((line, column)),
            format!(
                "`[`/`{{` nested deeper than {MAX_FLOW_DEPTH} levels; a pipeline needs only a few"
            ),
        )
    })
}

/// Where flow nesting first exceeds [`MAX_FLOW_DEPTH`], scanning once. A `[`, `{` or quote
/// counts only where YAML can start a value (line start, after `:` or `-`, and inside a flow
/// collection after `,`, `[` or `{`), so
/// brackets and apostrophes inside plain text (`run: test [ -f x ]`, `don't`) are not
/// mistaken for structure; comments are skipped.
fn deepest_flow(text: &str) -> Option<(usize, usize)> {
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut quote: Option<char> = None;
    let mut previous: Option<char> = None; // last non-blank character on this line
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        column += 1;
        if c == '\n' {
            (line, column, previous) = (line + 1, 0, None);
            continue;
        }
        if let Some(open) = quote {
            if c == '\\' && open == '"' {
                chars.next();
                column += 1;
            } else if c == open {
                quote = None;
                previous = Some(c);
            }
            continue;
        }
        let at_value = matches!(previous, None | Some(':' | '-' | '?'))
            || (depth > 0 && matches!(previous, Some(',' | '[' | '{')));
        match c {
            ' ' | '\t' | '\r' => continue,
            '#' => skip_line(&mut chars),
            '"' | '\'' if at_value => quote = Some(c),
            '[' | '{' if at_value => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some((line, column));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if c == '#' {
            (line, column, previous) = (line + 1, 0, None);
        } else {
            previous = Some(c);
        }
    }
    None
}

fn skip_line(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    for c in chars.by_ref() {
        if c == '\n' {
            break;
        }
    }
}

/// Why `name` is not a valid stage or pipeline name, if it is not.
pub fn name_problem(name: &str) -> Option<String> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if name.is_empty() || !valid_chars {
        return Some("may only hold letters, digits, `_` and `-`".to_string());
    }
    let count = name.chars().count();
    (count > MAX_NAME_CHARS).then(|| {
        format!("is {count} characters long, over the limit of {MAX_NAME_CHARS}; shorten it")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_flow_nesting_is_found_where_it_passes_the_limit() {
        let deep = format!("stages: {}", "[".repeat(100_000));
        assert_eq!(deepest_flow(&deep), Some((1, 9 + MAX_FLOW_DEPTH)));
        let ok = format!(
            "a: {}{}\n",
            "[".repeat(MAX_FLOW_DEPTH),
            "]".repeat(MAX_FLOW_DEPTH)
        );
        assert_eq!(deepest_flow(&ok), None);
    }

    #[test]
    fn brackets_in_plain_text_quotes_and_comments_are_not_nesting() {
        let many = "[".repeat(200);
        let text = format!(
            "a:\n  run: test {many} -f x\n  b: \"{many}\"\n  c: '{many}'\n  # {many}\n  d: don't {many}\n"
        );
        assert_eq!(deepest_flow(&text), None);
        let after_quote = format!("a: ['x', {}]\n", "[".repeat(MAX_FLOW_DEPTH));
        assert_eq!(deepest_flow(&after_quote), Some((1, 9 + MAX_FLOW_DEPTH)));
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_before_parsing() {
        let text = "#".repeat(MAX_FILE_BYTES + 1);
        assert_eq!(
            check_text(&text),
            Some((
                None,
                "the file is 16777217 bytes, over the limit of 16777216 bytes (16 MiB) for a pipeline"
                    .to_string()
            ))
        );
        assert_eq!(check_text("stages: {}\n"), None);
    }

    #[test]
    fn names_have_a_charset_and_a_length_limit() {
        assert_eq!(name_problem("db-2_x"), None);
        assert_eq!(name_problem(&"a".repeat(64)), None);
        assert_eq!(
            name_problem(&"a".repeat(300)),
            Some("is 300 characters long, over the limit of 64; shorten it".to_string())
        );
        assert_eq!(
            name_problem("a b"),
            Some("may only hold letters, digits, `_` and `-`".to_string())
        );
    }
}
