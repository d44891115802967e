//! House rules that no compiler checks, checked here: no module imports a
//! module that imports it back (directly or around a circle), and no source
//! file grows past what one concern needs. (Formatting, lints and API docs
//! are checked by `scripts/test.sh` itself.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `transfer/apply.rs` -> `transfer::apply`; `outbox/mod.rs` -> `outbox`;
/// `lib.rs`, `main.rs` -> "" (the crate roots, which only declare).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without its comments and its test module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The paths a `use` tree names: `a::{b, c::{d, self}}` -> a::b, a::c::d, a::c.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap_or_default().trim().to_owned()];
    };
    let (prefix, inner) = (&tree[..open], &tree[open + 1..tree.rfind('}').unwrap()]);
    let (mut parts, mut depth, mut current) = (Vec::new(), 0, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .flat_map(|p| {
            if p == "self" {
                vec![prefix.trim_end_matches("::").to_owned()]
            } else {
                expand(&format!("{prefix}{p}"))
            }
        })
        .collect()
}

/// The module files each module's code refers to (`use crate::..`, `use
/// super::..`, and `crate::..` paths inline).
fn imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let modules: BTreeMap<String, PathBuf> = files.iter().map(|f| (module_of(src, f), f.clone())).collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|m| modules.contains_key(m))
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &modules {
        let code = code(&std::fs::read_to_string(file).unwrap());
        let mut targets = Vec::new();
        for statement in code.split(';') {
            let Some(tree) =
                statement.trim().strip_prefix("use ").or_else(|| statement.trim().strip_prefix("pub use "))
            else {
                continue;
            };
            for path in expand(tree) {
                if let Some(rest) = path.strip_prefix("crate::") {
                    targets.push(rest.to_owned());
                } else if path.starts_with("super::") {
                    let mut base: Vec<&str> = module.split("::").filter(|s| !s.is_empty()).collect();
                    let mut rest = path.as_str();
                    while let Some(r) = rest.strip_prefix("super::") {
                        base.pop();
                        rest = r;
                    }
                    base.push(rest);
                    targets.push(base.join("::"));
                }
            }
        }
        for (i, _) in code.match_indices("crate::") {
            let path: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            targets.push(path);
        }
        let set = edges.entry(module.clone()).or_default();
        for t in targets {
            if let Some(m) = resolve(&t).filter(|m| m != module && !m.is_empty()) {
                set.insert(m);
            }
        }
    }
    edges
}

/// A circle of imports, if there is one: depth-first, with the path kept.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == next).unwrap();
                    let mut circle = path[start..].to_vec();
                    circle.push(next.clone());
                    return Some(circle);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, edges, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node) {
            if let Some(c) = visit(node, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_a_module_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = imports(&src);
    assert!(
        edges.get("transfer::apply").is_some_and(|e| e.contains("transfer::store")),
        "the scan sees imports: {edges:?}"
    );
    if let Some(circle) = find_cycle(&edges) {
        panic!("an import circle: {}", circle.join(" -> "));
    }
    // The binary's tools never reach back into its command line.
    for (module, targets) in &edges {
        if module.starts_with("tools") {
            assert!(!targets.iter().any(|t| t.starts_with("cli")), "{module} imports the command line: {targets:?}");
        }
    }
}

#[test]
fn the_circle_finder_finds_a_circle() {
    let edges: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]
    .into();
    assert_eq!(find_cycle(&edges).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(expand("crate::x::{y, z::{self, w}}"), ["crate::x::y", "crate::x::z", "crate::x::z::w"]);
}

#[test]
fn no_source_file_grows_past_one_concern() {
    let mut files = Vec::new();
    sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    for f in files {
        let lines = std::fs::read_to_string(&f).unwrap().lines().count();
        assert!(lines <= 600, "{} has {lines} lines: split it by concern", f.display());
    }
}
