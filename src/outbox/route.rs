//! Routes: which events go where. `--route 'PATTERN=DESTINATION[;FORMAT]'`,
//! where PATTERN is an event-type glob (see [`super::glob`]), DESTINATION
//! an SQS queue URL or an SNS topic ARN (FIFO topics included), and FORMAT
//! `native` (the default) or `cloudevents`. An event goes to every
//! destination whose pattern matches it; each (event, destination) pair has
//! its own delivery state (see the `destinations` migration).

use std::fmt;
use std::str::FromStr;

use super::glob;
use super::EventType;

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// An SQS queue, by URL (a name ending in `.fifo` is a FIFO queue).
    SqsQueue(String),
    /// An SNS topic, by ARN (a name ending in `.fifo` is a FIFO topic).
    SnsTopic(String),
}

impl Target {
    /// The destination as the outbox records it (`outbox.destination`): the
    /// URL without a trailing `/`, or the ARN.
    pub fn key(&self) -> &str {
        match self {
            Target::SqsQueue(url) | Target::SnsTopic(url) => url,
        }
    }

    /// What its name says; SQS or SNS confirm it at start.
    pub fn names_fifo(&self) -> bool {
        match self {
            Target::SqsQueue(url) => super::sqs::url_names_fifo_queue(url),
            Target::SnsTopic(arn) => arn.rsplit(':').next().is_some_and(|n| n.ends_with(".fifo")),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Some(rest) = t.strip_prefix("arn:") {
            // arn:partition:sns:region:account:name
            let parts: Vec<&str> = rest.split(':').collect();
            let ok = parts.len() == 5
                && parts[1] == "sns"
                && !parts[0].is_empty()
                && !parts[2].is_empty()
                && !parts[3].is_empty()
                && !parts[4].is_empty()
                && parts[4].chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            return if ok {
                Ok(Target::SnsTopic(t.to_owned()))
            } else {
                Err(format!("{t:?} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)"))
            };
        }
        let rest = t.strip_prefix("https://").or_else(|| t.strip_prefix("http://"));
        let path = rest.and_then(|r| r.split_once('/')).map(|(_, p)| p.trim_end_matches('/'));
        match path {
            Some(p) if !p.is_empty() && !p.rsplit('/').next().unwrap_or("").is_empty() => {
                Ok(Target::SqsQueue(t.trim_end_matches('/').to_owned()))
            }
            _ => Err(format!(
                "{t:?} is neither an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME) \
                 nor an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)"
            )),
        }
    }
}

/// How an event's body is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EventFormat {
    /// The contract's body (`event_id`, `event_type`, `transfer_id`,
    /// `occurred_at`, `schema_version`, `data`).
    #[default]
    Native,
    /// A CloudEvents 1.0 structured JSON event whose `data` is the native body.
    CloudEvents,
}

impl EventFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            EventFormat::Native => "native",
            EventFormat::CloudEvents => "cloudevents",
        }
    }
}

impl FromStr for EventFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "native" => Ok(EventFormat::Native),
            "cloudevents" => Ok(EventFormat::CloudEvents),
            other => Err(format!("format {other:?}: it is `native` or `cloudevents`")),
        }
    }
}

/// One `--route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The glob as written.
    pub pattern: String,
    /// The event types it matches (never empty).
    pub types: Vec<EventType>,
    pub target: Target,
    /// The route's own format (`;cloudevents`), or None for `--event-format`'s.
    pub format: Option<EventFormat>,
}

impl Route {
    /// The route every event takes when none is given: all of them to `target`.
    pub fn everything_to(target: Target) -> Route {
        Route { pattern: "*".into(), types: EventType::ALL.to_vec(), target, format: None }
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.pattern, self.target)?;
        if let Some(format) = self.format {
            write!(f, ";{}", format.as_str())?;
        }
        Ok(())
    }
}

impl FromStr for Route {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: String| format!("route {text:?}: {why}");
        let (pattern, rest) =
            text.split_once('=').ok_or_else(|| bad("a route is PATTERN=DESTINATION[;FORMAT], with an `=`".into()))?;
        let pattern = pattern.trim();
        if pattern.is_empty() {
            return Err(bad("the pattern (before `=`) is empty; `*` matches every event".into()));
        }
        let types = glob::event_types(pattern);
        if types.is_empty() {
            let known: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
            return Err(bad(format!("{pattern:?} matches no event type (they are: {})", known.join(", "))));
        }
        let (destination, format) = match rest.split_once(';') {
            Some((d, f)) => (d, Some(f.parse().map_err(bad)?)),
            None => (rest, None),
        };
        let target = destination.parse().map_err(bad)?;
        Ok(Route { pattern: pattern.to_owned(), types, target, format })
    }
}

/// Checks a set of routes: no destination twice (one destination, one
/// delivery state and one format: merge the patterns instead).
pub fn check(routes: &[Route]) -> Result<(), String> {
    for (i, r) in routes.iter().enumerate() {
        if let Some(first) = routes[..i].iter().find(|o| o.target == r.target) {
            return Err(format!(
                "route {r} names the destination of route {first} again: one route per destination \
                 (widen its pattern, e.g. `*`)"
            ));
        }
    }
    Ok(())
}

/// The event types that no route takes (recorded as undelivered, not an error).
pub fn unrouted_types(routes: &[Route]) -> Vec<EventType> {
    EventType::ALL.into_iter().filter(|t| !routes.iter().any(|r| r.types.contains(t))).collect()
}

/// The routes as each destination's relay claims by them.
#[derive(Debug, Clone)]
pub struct Routing {
    routes: Vec<Route>,
}

/// What one destination's claim needs (see `store::ClaimScope`), as text.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub types: Vec<String>,
    pub copy_types: Vec<String>,
    pub copy_destinations: Vec<String>,
}

impl Routing {
    pub fn new(routes: Vec<Route>) -> Routing {
        Routing { routes }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The unrouted events `destination` claims, and the copies its claim
    /// makes of them for the other destinations.
    pub fn scope_of(&self, destination: &str) -> Scope {
        let mut scope = Scope::default();
        let Some(own) = self.routes.iter().find(|r| r.target.key() == destination) else { return scope };
        scope.types = own.types.iter().map(|t| t.as_str().to_owned()).collect();
        for other in self.routes.iter().filter(|r| r.target.key() != destination) {
            for t in other.types.iter().filter(|t| own.types.contains(t)) {
                scope.copy_types.push(t.as_str().to_owned());
                scope.copy_destinations.push(other.target.key().to_owned());
            }
        }
        scope
    }

    /// The event types no route takes, as text.
    pub fn unrouted(&self) -> Vec<String> {
        unrouted_types(&self.routes).iter().map(|t| t.as_str().to_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_bad_ones_say_why() {
        let r: Route = "transfer.*=http://127.0.0.1:4566/000000000000/ledger/".parse().unwrap();
        assert_eq!(r.types.len(), 3);
        assert_eq!(r.target, Target::SqsQueue("http://127.0.0.1:4566/000000000000/ledger".into()));
        assert_eq!(r.format, None);
        let r: Route = "refund.completed=arn:aws:sns:us-east-1:000000000000:refunds.fifo;cloudevents".parse().unwrap();
        assert_eq!(r.types, [EventType::RefundCompleted]);
        assert!(r.target.names_fifo());
        assert_eq!(r.format, Some(EventFormat::CloudEvents));
        assert_eq!(r.to_string(), "refund.completed=arn:aws:sns:us-east-1:000000000000:refunds.fifo;cloudevents");
        for (text, needle) in [
            ("transfer.*", "with an `=`"),
            ("=http://h/1/q", "the pattern (before `=`) is empty"),
            ("payout.*=http://h/1/q", "matches no event type"),
            ("*=ftp://h/1/q", "neither an SQS queue URL"),
            ("*=http://host", "neither an SQS queue URL"),
            ("*=arn:aws:sqs:us-east-1:1:q", "not an SNS topic ARN"),
            ("*=arn:aws:sns:us-east-1:1:", "not an SNS topic ARN"),
            ("*=http://h/1/q;xml", "format \"xml\""),
        ] {
            let err = text.parse::<Route>().unwrap_err();
            assert!(err.contains(needle) && err.contains(text), "{text}: {err}");
        }
        let twice: Vec<Route> =
            ["transfer.*=http://h/1/q", "refund.*=http://h/1/q/"].iter().map(|r| r.parse().unwrap()).collect();
        assert!(check(&twice).unwrap_err().contains("names the destination of route"));
        assert_eq!(unrouted_types(&twice), Vec::<EventType>::new());
        assert_eq!(unrouted_types(&twice[..1]).len(), 3);
    }

    #[test]
    fn a_destination_claims_its_types_and_copies_them_for_the_others() {
        let routes: Vec<Route> =
            ["transfer.*=http://h/1/ledger", "*.failed=arn:aws:sns:r:1:alerts", "refund.completed=http://h/1/refunds"]
                .iter()
                .map(|r| r.parse().unwrap())
                .collect();
        let routing = Routing::new(routes);
        let ledger = routing.scope_of("http://h/1/ledger");
        assert_eq!(ledger.types, ["transfer.succeeded", "transfer.failed", "transfer.cancelled"]);
        assert_eq!(ledger.copy_types, ["transfer.failed"]);
        assert_eq!(ledger.copy_destinations, ["arn:aws:sns:r:1:alerts"]);
        let alerts = routing.scope_of("arn:aws:sns:r:1:alerts");
        assert_eq!(alerts.copy_types, ["transfer.failed"]);
        assert_eq!(alerts.copy_destinations, ["http://h/1/ledger"]);
        assert_eq!(routing.unrouted(), ["refund.requested"]);
        assert!(routing.scope_of("http://elsewhere/1/q").types.is_empty());
    }
}
