//! `/metrics`: the process's counters and histograms, and the database
//! gauges set from a status reading (shared with the console, at most one a
//! second; left out when the last reading is too old).

use crate::metrics::{metrics, DatabaseGauges};
use crate::status::Status;

/// The exposition, with the database gauges set from `status` (none if the
/// database could not be read: the counters are still worth having).
pub fn render(status: Option<&Status>) -> String {
    let m = metrics();
    if let Some(s) = status {
        let transfers: Vec<(&'static str, i64)> = s.transfers.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let refunds: Vec<(&'static str, i64)> = s.refunds.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let o = &s.outbox;
        let outbox = [("pending", o.pending), ("published", o.published), ("dead", o.dead), ("held", o.held)];
        let destinations: Vec<(&str, &'static str, i64)> = s
            .destinations
            .iter()
            .filter(|(d, _)| !d.is_empty())
            .flat_map(|(d, c)| {
                [("pending", c.pending), ("published", c.published), ("dead", c.dead), ("held", c.held)]
                    .map(|(state, n)| (d.as_str(), state, n))
            })
            .collect();
        m.set_database_gauges(&DatabaseGauges {
            transfers: &transfers,
            refunds: &refunds,
            outbox: &outbox,
            oldest_unpublished_age_s: s.oldest_unpublished_age_s,
            destinations: &destinations,
        });
    }
    m.encode()
}
