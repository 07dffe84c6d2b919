//! Quoting user input in error messages: short and printable, so that an error never
//! carries a large or binary payload (or much of a record) back to the caller.

/// At most this many characters of input are quoted.
pub const QUOTE_LIMIT: usize = 40;

/// The first [`QUOTE_LIMIT`] characters of `input`, control characters as `?`, and `…`
/// when something was cut.
pub fn excerpt(input: &str) -> String {
    let mut out: String = input
        .chars()
        .take(QUOTE_LIMIT)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if input.chars().count() > QUOTE_LIMIT {
        out.push('…');
    }
    out
}
