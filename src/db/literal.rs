//! Values written into SQL text, for the few statements that must travel in
//! one message with the transaction control around them.
//!
//! Why SQL text at all: sqlx sends a bound statement as a message of its own
//! and waits for its answer, and it sends `BEGIN` and `COMMIT` the same way.
//! The apply transaction was five round trips (BEGIN, claim, lock, write,
//! COMMIT); at the rates most teams run every transfer is a pass of its
//! own, and each round trip costs the worker a thread park and wake-up, most
//! of its CPU per transfer. PostgreSQL runs every statement of one simple
//! query message in order, so `BEGIN; claim` and `write; COMMIT` are two.
//! Such a message cannot carry bound parameters, so their values go into
//! the text, rendered here.
//!
//! Only what this module renders goes in: integers, and text from the
//! worker's own vocabulary (state and event names, the UUIDs it generates),
//! quoted as literals. A value from outside (an idempotency key, a
//! traceparent, an error message) never does: those statements stay bound.
//! The one exception, the operator's destination an apply batch hands its
//! events to, goes in as hex digits only ([`any_text`]).

/// A `bigint[]` literal: `'{1,2,3}'::bigint[]`.
pub fn bigints(values: &[i64]) -> String {
    let mut out = String::with_capacity(16 + values.len() * 8);
    out.push_str("'{");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&v.to_string());
    }
    out.push_str("}'::bigint[]");
    out
}

/// A `text[]` literal of the worker's own words (`None` is NULL):
/// `ARRAY['a',NULL]::text[]`.
///
/// # Panics
/// On a value outside [`is_plain`]: such a value must be bound instead,
/// and the caller that passed one is a bug.
pub fn texts<S: AsRef<str>>(values: &[Option<S>]) -> String {
    if values.is_empty() {
        return "'{}'::text[]".to_owned();
    }
    let mut out = String::from("ARRAY[");
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match v {
            Some(s) => out.push_str(&text(s.as_ref())),
            None => out.push_str("NULL"),
        }
    }
    out.push_str("]::text[]");
    out
}

/// A quoted text literal of the worker's own words (see [`texts`]).
///
/// # Panics
/// On a value outside [`is_plain`].
pub fn text(value: &str) -> String {
    assert!(is_plain(value), "{value:?} is not a word of the worker's own: it must be bound, not written into SQL");
    format!("'{value}'")
}

/// Any text, as an expression that rebuilds it from its UTF-8 bytes in
/// hexadecimal: `convert_from(decode('6869', 'hex'), 'UTF8')`. The text
/// itself never reaches the SQL, only hex digits do, so an operator's value
/// (a destination's URL, say) goes in safely whatever it holds.
pub fn any_text(value: &str) -> String {
    let mut out = String::with_capacity(40 + value.len() * 2);
    out.push_str("convert_from(decode('");
    for b in value.bytes() {
        out.push_str(&format!("{b:02x}"));
    }
    out.push_str("', 'hex'), 'UTF8')");
    out
}

/// Letters, digits, `_`, `.`, `-` and `:` only (state and event names,
/// UUIDs): nothing that could end a literal or mean anything else in one,
/// whatever the server's `standard_conforming_strings`.
pub fn is_plain(value: &str) -> bool {
    !value.is_empty() && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_words_render_as_literals() {
        assert_eq!(bigints(&[]), "'{}'::bigint[]");
        assert_eq!(bigints(&[1, -2, i64::MAX]), "'{1,-2,9223372036854775807}'::bigint[]");
        assert_eq!(texts::<&str>(&[]), "'{}'::text[]");
        assert_eq!(texts(&[Some("SUCCEEDED"), None]), "ARRAY['SUCCEEDED',NULL]::text[]");
        assert_eq!(text("0192d7a4-5b1e-7c3d-8e9f-0a1b2c3d4e5f"), "'0192d7a4-5b1e-7c3d-8e9f-0a1b2c3d4e5f'");
    }

    #[test]
    fn anything_that_could_leave_a_literal_is_refused() {
        for bad in ["", "a'b", "a b", "x\\y", "a;b", "é", "a\0"] {
            assert!(!is_plain(bad), "{bad:?}");
            assert!(std::panic::catch_unwind(|| text(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn any_text_goes_in_as_hex_digits_only() {
        assert_eq!(any_text("hi"), "convert_from(decode('6869', 'hex'), 'UTF8')");
        let hostile = "http://q/x'); DROP TABLE outbox; --\\é";
        let sql = any_text(hostile);
        let digits = &sql["convert_from(decode('".len()..sql.len() - "', 'hex'), 'UTF8')".len()];
        assert!(digits.bytes().all(|b| b.is_ascii_hexdigit()), "{sql}");
        let back: Vec<u8> =
            (0..digits.len()).step_by(2).map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap()).collect();
        assert_eq!(String::from_utf8(back).unwrap(), hostile);
    }
}
