//! Event-type globs, as `outbox replay --type` and routes take them: `*`
//! matches any run of characters (`.` included), `?` one character,
//! everything else itself (`transfer.*`, `refund.completed`, `*`).

use super::EventType;

/// Whether `text` matches `pattern`.
pub fn matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative wildcard matching with one backtrack point (the last `*`).
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < t.len() {
        if i < p.len() && (p[i] == '?' || p[i] == t[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    while i < p.len() && p[i] == '*' {
        i += 1;
    }
    i == p.len()
}

/// The event types `pattern` matches; empty if none (bad input for the caller).
pub fn event_types(pattern: &str) -> Vec<EventType> {
    EventType::ALL.into_iter().filter(|t| matches(pattern, t.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_event_types() {
        assert!(matches("*", "transfer.succeeded"));
        assert!(matches("transfer.*", "transfer.failed"));
        assert!(!matches("transfer.*", "refund.failed"));
        assert!(matches("*.failed", "refund.failed"));
        assert!(matches("refund.?ailed", "refund.failed"));
        assert!(!matches("refund", "refund.failed"));
        assert_eq!(event_types("refund.*").len(), 3);
        assert_eq!(event_types("*.failed"), [EventType::TransferFailed, EventType::RefundFailed]);
        assert!(event_types("payout.*").is_empty());
    }
}
